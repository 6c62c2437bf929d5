"""The drop-in examples run and learn the toy preference (a tiny model built from a config)."""

from hypo_fast.examples import hf_trainer_dpo, torch_loop_dpo


def test_plain_torch_loop_learns_the_preference():
    losses = torch_loop_dpo.main(steps=8)
    assert abs(losses[0] - 0.6931) < 1e-3  # policy == reference at step 0: −log σ(0)
    assert losses[-1] < 0.5 * losses[0]


def test_hf_trainer_compute_loss_learns_the_preference():
    history = hf_trainer_dpo.main(steps=8)
    rows = [row for row in history if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert all("rewards/margins" in row for row in rows)  # the loss's own metrics, logged on its step
    losses = [row["loss"] for row in rows]
    accuracies = [row["rewards/accuracies"] for row in history if "rewards/accuracies" in row]
    assert len(losses) == 8 and abs(losses[0] - 0.6931) < 1e-3
    assert losses[-1] < 0.5 * losses[0] and accuracies[-1] == 1.0

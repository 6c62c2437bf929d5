"""Drop-in examples: hypo_fast's fused losses inside other people's training loops."""

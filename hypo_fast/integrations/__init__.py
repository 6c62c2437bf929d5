"""Integrations with other trainers (import the submodule you need: ``hypo_fast.integrations.trl``)."""

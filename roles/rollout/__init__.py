"""The rollout role and its inference engines (torch, sglang)."""
from roles.rollout.role import Rollout  # noqa: F401

"""The reward role with its scorers, the code scorer and its sandbox."""
from roles.reward.role import Reward  # noqa: F401
from roles.reward.scorers import Scorer, get_scorer, register_scorer, scorer_names  # noqa: F401

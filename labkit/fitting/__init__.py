"""Lightning glue, in one place: what `labkit fit --config ...` runs.

    cli.py   LightningCLI for policies (EpisodeData: a dataset as random training windows) and for RL
             methods (configs/rl/*.yaml), with labkit's run folders
    rl.py    RLModule: any registered RL agent (`labkit.rl.Agent`) as a LightningModule; load_agent

It sits above the methods (policies, rl) and below the command line (`labkit.cli`); library code never
imports it.
"""

from labkit.fitting.cli import EpisodeData, main
from labkit.fitting.rl import RLModule, is_rl_checkpoint, load_agent, resolve_checkpoint

__all__ = ["EpisodeData", "RLModule", "is_rl_checkpoint", "load_agent", "main", "resolve_checkpoint"]

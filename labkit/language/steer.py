"""Language-conditioned policies on the Tabletop tasks: training data with a command per frame, the
runtime that embeds commands, a learned reasoner, and the measurements of steering.

One policy reads every level of command: a FlowPolicy (or any labkit policy) whose observation is the
state plus `observation.text`, the instruction's sentence embedding, read by FiLM next to the state.

    command_dataset     a Tabletop dataset (LeRobot layout: `task_index` per frame into `tasks`) ->
                        a copy per command level, each frame with its command's embedding
    LanguageRuntime     runs such a policy: whenever a new chunk is due it asks a commander (the task's
                        sentence, a ScriptedReasoner, a LearnedReasoner) for each env's command, embeds it
                        (cached) and hands it to the policy as `obs["text"]`; it logs what it said
    LearnedReasoner     a small model trained on the labelled segments: (state, task embedding) -> the
                        next motion, written as a motion command (`say` is its commander)
    controllability     commanded vs executed motion of each command, in cm
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from labkit.data.dataset import EpisodeDataset
from labkit.envs.tabletop import TASKS
from labkit.language.commands import (
    LEVELS,
    MOTION_STEPS,
    TRAIN_TEMPLATES,
    label_episode,
    motion_text,
    parse_motion,
    task_parts,
    task_text,
)
from labkit.language.text import check_width
from labkit.nn import mlp
from labkit.policies.base import Policy
from labkit.policies.runtime import ChunkRuntime
from labkit.training import minibatch_fit

TEXT_KEY = "observation.text"  # the env-side name is "text" (labkit.data.keys.env_key)
ENV = {"env_id": "labkit/Tabletop-v0", "env_kwargs": {"instruction": "text"}}


def episode_tasks(dataset: EpisodeDataset) -> list[int]:
    """The Tabletop task (0-11) of each episode, read from its frames' task strings (any paraphrase)."""
    names = {task_parts(i): i for i in range(len(TASKS))}
    out = []
    for a in dataset.episode_from:
        text = dataset.tasks[int(dataset.frames["task_index"][a])]
        found = [i for (colour, corner), i in names.items() if colour in text and corner in text]
        if len(found) != 1:
            raise ValueError(f"task {text!r} names no single Tabletop task (a colour of red/green/blue and a corner)")
        out.append(found[0])
    return out


def command_dataset(dataset: EpisodeDataset, encoder, levels: Sequence[str] = LEVELS,
                    templates: Sequence[str] = TRAIN_TEMPLATES) -> EpisodeDataset:
    """The episodes of a Tabletop dataset (recorded with instruction="text", e.g. the shipped `tabletop`
    or `labkit.envs.tabletop.demos`) once per command level, each frame's command embedded by `encoder`
    into `observation.text`. At the task level episode j says its task in `templates[j % len]`'s words.
    A level named twice is copied twice (a heavier share of the training batches), its r-th copy in
    the paraphrase r along (`templates[(j + r) % len]`). The commands become the dataset's `tasks`
    (LeRobot's per-frame instruction), so it records what was said at each frame; the Tabletop task of
    every episode is kept in `tabletop_task`."""
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad or not levels:
        raise ValueError(f"levels must name levels of {LEVELS} (a level may repeat), got {list(levels)}")
    state = np.asarray(dataset.frames["observation.state"])
    if state.shape[1] != 10:
        raise ValueError(f"command_dataset needs Tabletop states recorded with instruction='text' (10-D), got "
                         f"{state.shape[1]}-D")
    tasks = episode_tasks(dataset)
    episodes, commands = [], []
    for n, level in enumerate(levels):
        r = list(levels[:n]).count(level)  # how many copies of this level came before
        for j, (a, b, task) in enumerate(zip(dataset.episode_from, dataset.episode_to, tasks, strict=True)):
            said = label_episode(state[a:b], task, templates[(j + r) % len(templates)], (level,))[level]
            commands += said
            episodes.append({"observation.state": state[a:b], "action": np.asarray(dataset.frames["action"][a:b]),
                             "tabletop_task": np.full(b - a, task, np.int64)})
    vocab = list(dict.fromkeys(commands))
    table = encoder.embed(vocab).detach().cpu().numpy().astype(np.float32)
    index = {c: i for i, c in enumerate(vocab)}
    ids = np.array([index[c] for c in commands])
    out = EpisodeDataset.from_episodes(episodes, fps=dataset.fps, tasks=vocab,
                                       columns={TEXT_KEY: table[ids], "task_index": ids.astype(np.int64)})
    out.info["labkit"] = copy.deepcopy(ENV)
    out.info["features"][TEXT_KEY]["names"] = None
    return out


def join_commands(a: EpisodeDataset, b: EpisodeDataset) -> EpisodeDataset:
    """Two command datasets (command_dataset's output) end to end: a's episodes, then b's, with both
    vocabularies of commands (b's command indices moved past a's)."""
    episodes, text, index = [], [], []
    for d, offset in ((a, 0), (b, len(a.tasks))):
        for s, e in zip(d.episode_from, d.episode_to, strict=True):
            episodes.append({k: np.asarray(d.frames[k][s:e]) for k in ("observation.state", "action", "tabletop_task")})
        text.append(np.asarray(d.frames[TEXT_KEY]))
        index.append(np.asarray(d.frames["task_index"]) + offset)
    out = EpisodeDataset.from_episodes(episodes, fps=a.fps, tasks=list(a.tasks) + list(b.tasks),
                                       columns={TEXT_KEY: np.concatenate(text), "task_index": np.concatenate(index)})
    out.info["labkit"] = copy.deepcopy(ENV)
    out.info["features"][TEXT_KEY]["names"] = None
    return out


class LanguageRuntime(ChunkRuntime):
    """Runs a policy trained on `observation.text`: when a new chunk is due, `commander(state, task) -> str`
    says each env's command, `encoder` embeds it and the policy reads it. `logs` keeps, per finished or
    running episode (in rollout order), the (step, command) pairs it issued."""

    def __init__(self, policy: Policy, encoder, commander: Callable):
        if TEXT_KEY not in policy.config.obs_keys:
            raise ValueError(f"LanguageRuntime needs a policy that reads {TEXT_KEY!r}; this one reads "
                             f"{policy.config.obs_keys} (train it on command_dataset(...))")
        check_width(policy.shapes[TEXT_KEY][-1], encoder.width, f"{type(encoder).__name__}'s embedding")
        self.policy, self.encoder, self.commander = policy, encoder, commander
        self.logs: list[list[tuple[int, str]]] = []
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.policy.reset()
        self._text, self._step, self._batch = None, 0, None

    def predict_action_chunk(self, history):
        return self.policy.predict_action_chunk(history)

    @torch.no_grad()
    def select_action(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        if "task" not in obs:
            raise KeyError("LanguageRuntime needs the env's `task` observation: make Tabletop with instruction='text'")
        state = np.asarray(obs["state"])
        single = state.ndim == 1
        states, tasks = (state[None], np.asarray(obs["task"])[None]) if single else (state, np.asarray(obs["task"]))
        if self._batch is None:
            self._batch = [[] for _ in states]
            self.logs += self._batch
        if self._queue is None or self._queue.shape[1] == 0:  # a new chunk is due: a new command
            said = [self.commander(s, int(np.ravel(t)[0])) for s, t in zip(states, tasks, strict=True)]
            for log, c in zip(self._batch, said, strict=True):
                log.append((self._step, c))
            self._text = self.encoder.embed(said).detach().cpu().numpy().astype(np.float32)
        self._step += 1
        self.policy.eval()
        return super().select_action({**obs, "text": self._text[0] if single else self._text})


class LearnedReasoner(nn.Module):
    """A small reasoner learned from the labelled segments: (state, task embedding) -> the motion of the
    next MOTION_STEPS steps (m), written as a motion command. What the scripted reasoner knows from the
    expert's rule, it must learn from demonstrations."""

    def __init__(self, encoder, state_dim: int = 10, hidden: int = 256, layers: int = 3):
        super().__init__()
        self.encoder, self.sizes = encoder, {"state_dim": state_dim, "hidden": hidden, "layers": layers}
        self.net = mlp(state_dim + encoder.width, 2, hidden, layers)
        self.register_buffer("scale", torch.tensor(100.0))  # metres -> cm inside the net

    def forward(self, state: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([state * 10, text], -1)) / self.scale

    def fit(self, dataset: EpisodeDataset, steps: int = 2000, batch_size: int = 256, seed: int = 0,
            schedule: str | None = None) -> LearnedReasoner:
        """Regress the labelled motion of each frame of a Tabletop dataset (LeRobot layout) from its state and
        its task sentence's embedding (`schedule`: minibatch_fit's, e.g. "cosine")."""
        state = torch.as_tensor(np.asarray(dataset.frames["observation.state"]), dtype=torch.float32)
        target = np.concatenate([[parse_motion(m) for m in label_episode(state[a:b].numpy(), t)["motion"]]
                                 for a, b, t in zip(dataset.episode_from, dataset.episode_to, episode_tasks(dataset),
                                                    strict=True)])
        target = torch.as_tensor(target, dtype=torch.float32)
        # the encoder is frozen here (a learned VocabEncoder's table too): its embeddings are inputs
        text = self.encoder.embed([dataset.tasks[int(i)] for i in dataset.frames["task_index"]]).detach().float()

        def loss(i):
            return (self(state[i], text[i]) - target[i]).pow(2).sum(-1).mean() * 1e4  # cm^2

        losses = minibatch_fit(self.net, loss, len(state), steps, batch_size, seed=seed, schedule=schedule)
        self.final_loss = float(losses[-500:].mean())
        return self.eval()

    def save(self, path) -> None:
        torch.save({"sizes": self.sizes, "width": self.encoder.width, "net": self.net.state_dict()}, path)

    @classmethod
    def load(cls, path, encoder) -> LearnedReasoner:
        """A saved reasoner (weights only), reading `encoder`'s embeddings (the width it was trained with)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"no reasoner checkpoint at {path}")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            sizes, width, weights = ckpt["sizes"], ckpt["width"], ckpt["net"]
        except Exception as e:  # truncated, not a checkpoint, or another object's
            raise ValueError(f"{path} is not a LearnedReasoner checkpoint ({type(e).__name__}: {e})") from None
        check_width(width, encoder.width, f"{type(encoder).__name__}'s embedding")
        out = cls(encoder, **sizes)
        out.net.load_state_dict(weights)
        return out.eval()

    @torch.no_grad()
    def say(self, state, task: int, template: str = TRAIN_TEMPLATES[0]) -> str:
        """The commander's call: the next motion command for one env's state and task."""
        text = self.encoder.embed([task_text(int(task), template)]).float()
        move = self.forward(torch.as_tensor(np.asarray(state), dtype=torch.float32)[None], text)[0].numpy()
        dx, dy = np.rint(move * 100).astype(int)
        return motion_text(int(dx), int(dy))


def controllability(episodes, logs: list[list[tuple[int, str]]]) -> tuple[np.ndarray, np.ndarray]:
    """(commanded, executed) displacement [N, 2] (cm, x right, y up) of each motion command issued, over the
    MOTION_STEPS steps that followed it, from rollout episodes kept with `keep=("obs",)` and a
    LanguageRuntime's logs (same order); the error is their difference. Commands whose window ran past the
    episode's end are skipped."""
    if len(episodes) != len(logs):
        raise ValueError(f"{len(episodes)} episodes but {len(logs)} command logs: roll out once with a fresh runtime")
    commanded, executed = [], []
    for ep, log in zip(episodes, logs, strict=True):
        p = ep.obs["state"][:, :2]
        for t, command in log:
            if t + MOTION_STEPS < len(p):
                commanded.append(parse_motion(command) * 100)
                executed.append((p[t + MOTION_STEPS] - p[t]) * 100)
    return np.reshape(commanded, (-1, 2)), np.reshape(executed, (-1, 2))


__all__ = ["ENV", "TEXT_KEY", "LanguageRuntime", "LearnedReasoner", "command_dataset", "controllability", "join_commands",
           "episode_tasks"]

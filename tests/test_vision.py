"""The image pipeline and encoders (labkit.vision) and the env's look options (labkit.envs.look)."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import labkit
import labkit.envs
from labkit.data import EpisodeDataset
from labkit.envs.look import RANDOM_LOOK, REAL_LOOK
from labkit.policies import FlowPolicy, fit
from labkit.vision import (
    ObsEncoder,
    PretrainedEncoder,
    SpatialSoftmax,
    random_shift,
    to_float,
)
from labkit.vision.frames import FrameTable
from labkit.vision.pretrain import RECIPES, render, train_encoder


def test_spatial_softmax_finds_a_bright_spot():
    """One hot pixel per map, logits far above the rest: each keypoint is that pixel's (x, y) in [-1, 1]."""
    maps = torch.zeros(2, 3, 16, 12)
    spots = [(0, 0), (15, 11), (4, 9)]  # (row, column)
    for k, (r, c) in enumerate(spots):
        maps[:, k, r, c] = 60.0
    kp = SpatialSoftmax()(maps).view(2, 3, 2)
    want = torch.tensor([[-1 + 2 * c / 11, -1 + 2 * r / 15] for r, c in spots])
    torch.testing.assert_close(kp[0], want, atol=1e-4, rtol=0)
    # a flat map has its keypoint at the centre
    assert torch.allclose(SpatialSoftmax()(torch.zeros(1, 1, 8, 8)), torch.zeros(1, 2), atol=1e-6)


def test_random_shift_copies_whole_pixels():
    """Each shifted image is the replicate-padded image cropped at an integer offset of at most `pad`."""
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    y = random_shift(x, pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for i in range(6):
        crops = [padded[i, :, r:r + 16, c:c + 16] for r in range(5) for c in range(5)]
        assert min(float((y[i] - crop).abs().max()) for crop in crops) < 1e-5
    assert not torch.equal(y, x)  # 6 images, 25 offsets: some moved


def test_images_in_the_wrong_layout_are_named_errors():
    with pytest.raises(ValueError, match="channels last"):
        to_float(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        to_float(torch.zeros(2, 64, 64, 3))
    enc = PretrainedEncoder(["a"], 64, "top", "arm")
    with pytest.raises(ValueError, match="64x64"):
        enc(torch.zeros(1, 96, 96, 3, dtype=torch.uint8))


def test_a_look_changes_the_pixels_and_nothing_else():
    envs = {name: gym.make("labkit/ArmPickCube-v0", obs_mode="pixels", image_size=32, look=look)
            for name, look in (("nominal", None), ("real", REAL_LOOK), ("random", RANDOM_LOOK))}
    obs = {name: env.reset(seed=4)[0] for name, env in envs.items()}
    for _ in range(5):
        a = envs["nominal"].action_space.sample()
        obs = {name: env.step(a)[0] for name, env in envs.items()}
    for name in ("real", "random"):
        np.testing.assert_array_equal(obs[name]["state"], obs["nominal"]["state"])
        assert np.abs(obs[name]["pixels"].astype(int) - obs["nominal"]["pixels"]).mean() > 5
    # the same seed gives the same random look; another seed another
    again = gym.make("labkit/ArmPickCube-v0", obs_mode="pixels", image_size=32, look=RANDOM_LOOK)
    other = gym.make("labkit/ArmPickCube-v0", obs_mode="pixels", image_size=32, look={**RANDOM_LOOK, "image_noise": 0})
    a0 = again.reset(seed=4)[0]["pixels"].astype(int)
    b0 = envs["random"].reset(seed=4)[0]["pixels"].astype(int)
    assert np.abs(a0 - b0).mean() < 1e-9
    assert np.abs(other.reset(seed=5)[0]["pixels"].astype(int) - b0).mean() > 3


@pytest.mark.parametrize("look, match", [({"lighting": -1}, "lighting"), ({"colour": 1}, "color_jitter"),
                                         ({"tint": (1, 2)}, None), ({"tint": (1, 1, 9)}, "tint"), ("bright", "dict")])
def test_bad_look_options_are_named(look, match):
    if match is None:  # a (low, high) range is allowed
        gym.make("labkit/Detour-v0", look=look)
        return
    with pytest.raises((ValueError, TypeError), match=match):
        gym.make("labkit/Detour-v0", look=look)


def test_frame_table_gathers_windows_lazily():
    frames = torch.arange(10 * 2 * 2 * 3, dtype=torch.uint8).view(10, 2, 2, 3)
    index = torch.tensor([[0, 1], [1, 2], [5, 5]])
    table = FrameTable(frames, index)
    assert len(table) == 3 and table.shape == (3, 2, 2, 2, 3)
    torch.testing.assert_close(table[torch.tensor([2, 0])], frames[index[[2, 0]]])
    feats = torch.randn(10, 4, 5)  # 4 variants of 5 features per frame
    out = FrameTable(feats, index, variants=True)[torch.tensor([0, 1, 2])]
    assert out.shape == (3, 2, 5)
    for b in range(3):
        for t in range(2):
            assert any(torch.equal(out[b, t], feats[index[b, t], v]) for v in range(4))


def test_pretrained_encoder_saves_and_loads_weights_only(tmp_path):
    enc = PretrainedEncoder(["cube_x", "cube_y"], 32, "top", "arm", keypoints=4, channels=8, hidden=16)
    path = enc.save(tmp_path / "enc.pt")
    back = PretrainedEncoder.load(path)
    x = torch.randint(0, 255, (3, 32, 32, 3), dtype=torch.uint8)
    torch.testing.assert_close(back(x), enc.freeze()(x))
    assert not any(p.requires_grad for p in back.parameters()) and not back.training
    with pytest.raises(FileNotFoundError, match="shipped"):
        PretrainedEncoder.load("no_such_task_top")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="bad.pt|pickle|load"):
        PretrainedEncoder.load(tmp_path / "bad.pt")
    torch.save({"meta": {"targets": ["a"]}, "state_dict": {}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="not a labkit pretrained encoder"):
        PretrainedEncoder.load(tmp_path / "partial.pt")


def test_pretraining_learns_where_things_are_from_pixels():
    """300 steps on 24 expert placements rendered at 32 px under random looks already read the zone's
    position on 4 held-out placements far better than guessing the mean (measured: RMSE 0.3-0.4 of the
    spread). At 32 px the 3 cm cube is one or two pixels: it needs the shipped 64 px and more placements."""
    torch.manual_seed(0)
    data = render("arm", size=32, episodes=24, every=2)
    held = data["episode"] >= 20
    enc, rmse, _ = train_encoder(data["images"]["pixels"], data["targets"], held, "arm", "pixels", steps=300,
                              batch_size=64)
    spread = data["targets"].std(0)  # guessing the mean of all placements
    names = RECIPES["arm"].targets
    for name in ("zone_x", "zone_y"):
        assert rmse[name] < 0.6 * spread[names.index(name)], (name, rmse[name], spread[names.index(name)])


def _pixel_arm_dataset(episodes=2, size=32):
    env = gym.make("labkit/ArmPickCube-v0", obs_mode="pixels", image_size=size)
    expert = labkit.envs.expert(env)
    eps = []
    for e in range(episodes):
        obs, _ = env.reset(seed=e)
        expert.reset() if hasattr(expert, "reset") else None
        rows = {"observation.proprio": [], "observation.images.top": [], "observation.images.wrist": [], "action": []}
        for _ in range(40):
            a = expert(obs) if callable(expert) else expert.select_action(obs)
            rows["observation.proprio"].append(obs["proprio"])
            rows["observation.images.top"].append(obs["pixels"])
            rows["observation.images.wrist"].append(obs["wrist"])
            rows["action"].append(np.asarray(a, np.float32))
            obs, *_ = env.step(a)
        eps.append({k: np.stack(v) for k, v in rows.items()})
    return EpisodeDataset.from_episodes(eps, fps=20)


@pytest.mark.parametrize("kind", ["keypoints", "pretrained"])
def test_pixel_policies_train_and_act(kind, tmp_path):
    """A flow policy reads two cameras + joints with an end-to-end keypoint encoder or a frozen
    pretrained one; the frozen one's weights never move, and its features computed ahead (the clean
    variant) are the ones it computes online."""
    size = 32
    ds = _pixel_arm_dataset(size=size)
    keys = ("observation.proprio", "observation.images.top", "observation.images.wrist")
    config = dict(obs_keys=keys, horizon=8, n_action_steps=4, obs_horizon=2, hidden=32, layers=1, steps=3,
                  image_encoder=kind, image_dim=8)
    if kind == "pretrained":
        for cam in ("top", "wrist"):
            PretrainedEncoder(RECIPES["arm"].targets, size, cam, "tiny", keypoints=4, channels=8, hidden=8).save(
                labkit.vision.encoders.WEIGHTS / f"tinytest_{cam}.pt")
        config["pretrained"] = "tinytest"
    try:
        torch.manual_seed(0)
        policy = FlowPolicy.from_dataset(ds, **config)
        enc = next(m for m in policy.modules() if isinstance(m, ObsEncoder))
        before = {k: v.clone() for k, v in enc.state_dict().items()}
        fit(policy, ds, steps=4, batch_size=8, progress=False)
        moved = [k for k, v in enc.state_dict().items() if not torch.equal(v, before[k])]
        if kind == "pretrained":
            assert moved == []
            shipped = PretrainedEncoder.load("tinytest_top").state_dict()  # the trained weights, not a fresh net
            assert all(torch.equal(v, shipped[k]) for k, v in enc.encoder("observation.images.top").state_dict().items())
            top = enc.encoder("observation.images.top")
            frames = torch.as_tensor(ds.frames["observation.images.top"][:5])
            torch.testing.assert_close(top.precompute(frames, variants=2)[:, 0], top(frames))
        else:
            assert any("images" in k for k in moved)
        env = gym.make("labkit/ArmPickCube-v0", obs_mode="pixels", image_size=size)
        obs, _ = env.reset(seed=0)
        policy.reset()
        torch.manual_seed(1)
        action = policy.select_action(obs)
        assert action.shape == (6,) and np.isfinite(action).all()
        for cam in ("top", "wrist"):  # the checkpoint carries the frozen encoders: no weight files needed
            (labkit.vision.encoders.WEIGHTS / f"tinytest_{cam}.pt").unlink(missing_ok=True)
        back = labkit.policies.policy_from_checkpoint(policy.checkpoint())  # rebuilt: same weights, same action
        back.reset()
        torch.manual_seed(1)
        np.testing.assert_allclose(back.select_action(obs), action, atol=1e-5)
    finally:
        for cam in ("top", "wrist"):
            (labkit.vision.encoders.WEIGHTS / f"tinytest_{cam}.pt").unlink(missing_ok=True)

"""Every observation kind reaches the model as a uint8 image of the model's size and/or a float vector;
third-party ids (`<module>:<EnvId>`) import their module; unmodellable spaces are one-line errors."""
import gymnasium
import numpy as np
import pytest
import torch

from agents.train import obs_spec
from envs import EnvConfig, EnvError, make_env
from envs.observations import ModelObservations

MOD = "tests.envs.kinds:longdream-test"


@pytest.mark.parametrize("kind,size,grayscale,pixels,vector", [
    ("AtariLike", 0, False, (3, 64, 64), None),  # 210 x 160 x 3 -> 64 x 64 (not a square power of two)
    ("AtariLike", 32, True, (1, 32, 32), None),
    ("CHW", 0, False, (3, 64, 64), None),
    ("Gray", 16, False, (1, 16, 16), None),
    ("Box2D", 0, False, None, 20),
    ("Discrete", 0, False, None, 5),
    ("MultiDiscrete", 0, False, None, 5),
    ("MultiBinary", 0, False, None, 4),
    ("DictVector", 0, False, None, 4),
    ("DictImageText", 0, False, (3, 32, 32), None),  # 32 x 32 is kept; the text part is dropped
    ("DictImageVector", 16, False, (3, 16, 16), 5),  # both parts: an image and a vector (3 + one-hot 2)
])
def test_observation_kinds(kind, size, grayscale, pixels, vector):
    cfg = EnvConfig(id=f"{MOD}/{kind}-v0", time_limit=5, image_size=size, grayscale=grayscale)
    with pytest.warns(UserWarning, match="note") if kind == "DictImageText" else _nothing():
        env = make_env(cfg)
    td = env.rollout(4)
    spec = obs_spec(env)
    if pixels:
        assert td["pixels"].dtype == torch.uint8 and td["pixels"].shape == (4, *pixels)
        assert spec.image == (pixels[1], pixels[2], pixels[0]) and spec.pixels
    if vector:
        assert td["observation"].dtype == torch.float32 and td["observation"].shape == (4, vector)
    assert spec.obs_dim == (vector or 0) and spec.pixels == bool(pixels)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_one_hot_and_flattening_values():
    from tests.envs.kinds import Kinds

    env = ModelObservations(Kinds("MultiDiscrete"))
    v = env.observation(np.array([2, 0]))
    assert v.tolist() == [0, 0, 1, 1, 0]
    env = ModelObservations(Kinds("DictVector"))
    v = env.observation({"pos": np.array([0.5, -0.25]), "flag": 1})
    assert v.dtype == np.float32 and v.tolist() == [0.0, 1.0, 0.5, -0.25]  # in the space's key order (sorted): flag, pos


def test_dict_example_env_is_the_flat_env_split():
    """The Dict Pendulum of envs/examples.py reaches the model as the same vector as Pendulum-v1, so the
    benchmark of Dict observations compares the two on equal inputs."""
    flat = make_env(EnvConfig(id="Pendulum-v1", time_limit=200), seed=3)
    split = make_env(EnvConfig(id="envs.examples:longdream/PendulumDict-v1", time_limit=200), seed=3)
    assert split.observation_spec["observation"].shape == flat.observation_spec["observation"].shape == (3,)
    actions = torch.linspace(-2, 2, 20).unsqueeze(-1)
    obs = []
    for env in (flat, split):
        td = env.reset()
        seen = [td["observation"]]
        for t in range(20):
            td = env.step(td.set("action", actions[t]))["next"]
            seen.append(td["observation"])
        obs.append(torch.stack(seen))
    assert torch.equal(obs[0], obs[1])


def test_image_layouts_agree():
    """The same picture as H x W x C, C x H x W and resized keeps its content (a left-right ramp)."""
    from tests.envs.kinds import Kinds

    ramp = np.tile(np.linspace(0, 255, 24, dtype=np.uint8)[None, :, None], (24, 1, 3))  # (24, 24, 3)
    chw = ModelObservations(Kinds("CHW"), image_size=32).observation(ramp.transpose(2, 0, 1))["pixels"]
    assert chw.shape == (32, 32, 3) and chw[:, 0].mean() < 20 and chw[:, -1].mean() > 235
    gray = ModelObservations(Kinds("Gray"), image_size=8).observation(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (40, 1)))["pixels"]
    assert gray.shape == (8, 8, 1) and gray[0, 0, 0] < gray[0, -1, 0]


@pytest.mark.parametrize("kind,needle", [("DictTwoImages", "several image observations"),
                                         ("OnlyText", "nothing to model")])
def test_unmodellable_spaces_are_one_line_errors(kind, needle):
    with pytest.raises(EnvError, match=needle) as e, pytest.warns(UserWarning) if kind == "OnlyText" else _nothing():
        make_env(EnvConfig(id=f"{MOD}/{kind}-v0"))
    assert "\n" not in str(e.value)


def test_third_party_module_ids_and_missing_packages():
    assert "longdream-test/Discrete-v0" in gymnasium.envs.registry or make_env(EnvConfig(id=f"{MOD}/Discrete-v0"))
    with pytest.raises(EnvError, match="pip install no-such-pkg") as e:
        make_env(EnvConfig(id="no_such_pkg:Thing-v0"))
    assert "\n" not in str(e.value)
    with pytest.raises(EnvError, match="longdream\\[atari\\]"):
        make_env(EnvConfig(id="Pong-v5", imports=["ale_py"])) if __import__("importlib").util.find_spec("ale_py") is None \
            else pytest.skip("ale_py is installed")


def test_missing_dependency_of_a_registered_env_is_one_line():
    pytest.importorskip("gymnasium")
    if __import__("importlib").util.find_spec("Box2D") is not None:
        pytest.skip("Box2D is installed")
    with pytest.raises(EnvError, match="not installed") as e:
        make_env(EnvConfig(id="LunarLander-v3"))
    assert "\n" not in str(e.value)


def test_image_size_option_is_checked():
    with pytest.raises(EnvError, match="image_size"):
        EnvConfig(image_size=48)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["AtariLike", "CHW", "Gray", "Box2D", "Discrete", "MultiDiscrete", "MultiBinary",
                                  "DictVector", "DictImageVector"])
def test_every_observation_kind_trains_through_the_cli(tmp_path, kind):
    from agents.cli import main

    fast = ["size=xs", "prefill=100", "train_ratio=16", "batch_size=4", "seq_len=8", "log_every=100",
            "eval_episodes=1", "eval_every=0", "progress=false", "collect_every=8", "steps=300"]
    extra = ["env.image_size=16"] if kind in ("AtariLike", "Gray", "DictImageVector") else []
    if kind == "DictImageVector":  # two observation parts: open-loop video of the image, and a resume
        extra.append("video_every=100")
    assert main(["train", f"env.id={MOD}/{kind}-v0", f"run_dir={tmp_path / kind}", *fast, *extra]) == 0
    assert any((tmp_path / kind / "checkpoints").iterdir())
    if kind == "DictImageVector":
        assert list((tmp_path / kind / "videos").glob("open_loop-*.gif"))
        assert main(["train", f"run_dir={tmp_path / kind}", "steps=400", "progress=false"]) == 0

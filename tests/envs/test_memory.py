"""The memory-probe tasks: gymnasium API, determinism, scripted policies, episode limits, kwargs errors
and the optional BSuite / Memory Maze adapters."""
import importlib
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  registers the ids
import envs.memory
from envs.memory.grid import MOVES

SMALL = [
    ("longdream/DistractingMemory-v0", {"length": 6}),
    ("longdream/MultiDoorsKeys-v0", {"keys": 3, "max_steps": 200}),
    ("longdream/Rooms-v0", {"rooms": 2}),
    ("longdream/Teleport-v0", {"rooms": 4}),
]
IDS = [i for i, _ in SMALL]


def run(env, seed, policy, steps=None):
    """Observations, rewards, infos and the end flags of one episode (or `steps` steps)."""
    obs, info = env.reset(seed=seed)
    out = {"obs": [obs], "rewards": [], "infos": [info], "end": None}
    t = 0
    while steps is None or t < steps:
        obs, r, term, trunc, info = env.step(policy(t))
        t += 1
        out["obs"].append(obs)
        out["rewards"].append(r)
        out["infos"].append(info)
        if term or trunc:
            out["end"] = (term, trunc)
            break
    return out


def scripted(env):
    return lambda t: env.unwrapped.scripted_action()


def random_actions(n, seed=0):
    acts = np.random.default_rng(seed).integers(n, size=10_000)
    return lambda t: int(acts[t])


def test_registered_ids_and_reimport():
    assert envs.memory.TASKS == ("longdream/DistractingMemory-v0", "longdream/MultiDoorsKeys-v0",
                                 "longdream/Rooms-v0", "longdream/Teleport-v0")
    for i in envs.memory.TASKS + ("longdream/BSuiteMemoryLen-v0", "longdream/BSuiteDiscountingChain-v0",
                                  "longdream/MemoryMaze-v0"):
        assert i in gym.envs.registry
    importlib.reload(envs.memory)  # registering again is a no-op, not an error or a warning
    assert gym.spec("longdream/DistractingMemory-v0").kwargs == {"length": 100}


@pytest.mark.parametrize("env_id,kwargs", SMALL, ids=IDS)
def test_gymnasium_api(env_id, kwargs):
    env = gym.make(env_id, render_mode="rgb_array", **kwargs)
    check_env(env.unwrapped)
    u = env.unwrapped
    assert env.observation_space == gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    assert isinstance(env.action_space, gym.spaces.Discrete)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert np.array_equal(env.render(), obs)
    C, Q = u.probe_split
    assert C >= 1 and Q >= 1 and C + Q - 1 <= u.max_steps


@pytest.mark.parametrize("env_id,kwargs", SMALL, ids=IDS)
def test_deterministic_under_seed(env_id, kwargs):
    env = gym.make(env_id, **kwargs)
    for policy in (random_actions(env.action_space.n), scripted(env)):
        a, b = run(env, 3, policy, 40), run(env, 3, policy, 40)
        assert len(a["obs"]) == len(b["obs"])
        assert all(np.array_equal(x, y) for x, y in zip(a["obs"], b["obs"]))
        assert a["rewards"] == b["rewards"]
    c = run(env, 4, random_actions(env.action_space.n), 40)
    a = run(env, 3, random_actions(env.action_space.n), 40)
    assert not all(np.array_equal(x, y) for x, y in zip(a["obs"], c["obs"]))


@pytest.mark.parametrize("env_id,kwargs", SMALL, ids=IDS)
def test_episodes_end_within_the_limit(env_id, kwargs):
    env = gym.make(env_id, **kwargs)
    out = run(env, 0, random_actions(env.action_space.n, seed=1))
    assert out["end"] is not None and len(out["rewards"]) <= env.unwrapped.max_steps


@pytest.mark.parametrize("env_id,kwargs", SMALL[:2], ids=IDS[:2])
def test_hidden_state_in_every_info(env_id, kwargs):
    env = gym.make(env_id, **kwargs)
    out = run(env, 0, scripted(env), 5)
    keys = set(out["infos"][0]["state"])
    assert keys and all(set(i["state"]) == keys for i in out["infos"])
    assert all(v.dtype == np.float32 and set(np.unique(v)) <= {0.0, 1.0} for v in out["infos"][0]["state"].values())


def test_distracting_memory_scripted():
    env = gym.make("longdream/DistractingMemory-v0", length=8)
    u = env.unwrapped
    C, Q = u.probe_split
    rewards = set()
    for seed in range(20):
        out = run(env, seed, scripted(env))
        assert out["end"] == (True, False)
        assert len(out["obs"]) == C + Q  # the query ends at the reward
        assert u.x == u.junction and u.y in (0, 2)
        assert out["rewards"][:-1] == [0.0] * (len(out["rewards"]) - 1)
        assert out["infos"][-1]["success"] == (out["rewards"][-1] == 1.0)
        rewards.add(out["rewards"][-1])
    assert rewards == {0.0, 1.0}


def test_distracting_memory_cue_only_at_the_start():
    env = gym.make("longdream/DistractingMemory-v0", length=20)
    u = env.unwrapped
    C, _ = u.probe_split
    r = u.view.radius
    env.reset(seed=0)
    for t in range(C):
        cue_in_view = u.x - r <= u.ROOM  # the start room's walls show the cue
        assert cue_in_view == (t < C - 2)  # out of view for the last two context steps
        assert u.x + r < u.junction  # the end cells stay out of view during the context
        env.step(u.scripted_action())
    # the end cell of the cue's colour pays 1, the other 0
    for side, action in enumerate((u.UP, u.DOWN)):
        env.reset(seed=1)
        while u.x < u.junction:
            env.step(u.RIGHT)
        _, reward, term, _, _ = env.step(action)
        assert term and reward == float(u.ends[side] == u.cue)
    # the end cells never change: the reward follows from the cue and the final action alone
    for seed in range(10):
        out = run(env, seed, scripted(env))
        final = 0 if out["infos"][-1]["state"]["cue"][0] == 1 else 1
        assert u.ends == (0, 1) and out["rewards"][-1] == float(u.y == (0 if final == 0 else 2))


@pytest.mark.parametrize("keys", [3, 5, 7])
def test_doors_keys_scripted_opens_every_door(keys):
    env = gym.make("longdream/MultiDoorsKeys-v0", keys=keys)
    u = env.unwrapped
    assert u.probe_split == (500, 100) and u.max_steps == 600
    out = run(env, keys, scripted(env))
    assert out["end"] == (False, True) and len(out["rewards"]) == 600
    assert sum(out["rewards"]) == keys and out["infos"][-1]["success"] and u.opened.all()
    assert out["infos"][-1]["state"]["doors_open"].tolist() == [1.0] * keys


def test_doors_need_their_key():
    env = gym.make("longdream/MultiDoorsKeys-v0", keys=2)
    u = env.unwrapped
    env.reset(seed=0)
    front = u._front(0)
    u.pos = front
    into = MOVES.index((u.doors[0][0] - front[0], u.doors[0][1] - front[1]))
    _, reward, *_ = env.step(into)
    assert reward == 0.0 and not u.opened[0] and u.pos == front  # locked without the key
    u.held[0] = True
    _, reward, *_ = env.step(into)
    assert reward == 1.0 and u.opened[0] and not u.held[0]  # the key is used up
    _, reward, *_ = env.step(into)
    assert reward == 0.0 and u.pos == u.doors[0]  # an open door is just a passage


@pytest.mark.parametrize("rooms", [2, 4, 10])
def test_rooms_tour_sees_every_room_in_the_context(rooms):
    env = gym.make("longdream/Rooms-v0", rooms=rooms)
    u = env.unwrapped
    C, Q = u.probe_split
    for seed in range(3):
        out = run(env, seed, scripted(env))
        assert out["end"] == (False, True) and len(out["obs"]) == C + Q
        assert {i["room"] for i in out["infos"][:C]} == set(range(rooms))
        assert {i["room"] for i in out["infos"][C - 1:]} == set(range(rooms))  # the query's tour revisits all
        assert sum(out["rewards"]) > 0 and not any(i["teleported"] for i in out["infos"])


def test_teleport_jumps_to_a_visited_cell_at_the_end_of_the_context():
    env = gym.make("longdream/Teleport-v0", rooms=4)
    u = env.unwrapped
    C, _ = u.probe_split
    for seed in range(3):
        out = run(env, seed, scripted(env))
        pos = [tuple(i["pos"]) for i in out["infos"]]
        jumps = [t for t in range(1, len(pos)) if abs(pos[t][0] - pos[t - 1][0]) + abs(pos[t][1] - pos[t - 1][1]) > 1]
        assert jumps == [C - 1]  # the last context observation shows the landing place
        assert out["infos"][C - 1]["teleported"] and sum(i["teleported"] for i in out["infos"]) == 1
        assert pos[C - 1] in pos[:C - 1]
        assert out["infos"][C - 1]["room"] != out["infos"][C - 2]["room"]


@pytest.mark.parametrize("env_id,kwargs,needle", [
    ("longdream/DistractingMemory-v0", {"length": 0}, "length"),
    ("longdream/DistractingMemory-v0", {"length": "long"}, "length"),
    ("longdream/DistractingMemory-v0", {"obs_size": 20}, "obs_size"),
    ("longdream/MultiDoorsKeys-v0", {"keys": 99}, "keys"),
    ("longdream/MultiDoorsKeys-v0", {"keys": 0}, "keys"),
    ("longdream/MultiDoorsKeys-v0", {"max_steps": 10}, "max_steps"),
    ("longdream/Rooms-v0", {"rooms": 1}, "rooms"),
    ("longdream/Teleport-v0", {"rooms": 99}, "rooms"),
    ("longdream/MemoryMaze-v0", {"size": 10}, "size"),
    ("longdream/BSuiteMemoryLen-v0", {"memory_length": 0}, "memory_length"),
])
def test_bad_kwargs_are_one_line_value_errors(env_id, kwargs, needle):
    with pytest.raises(ValueError) as e:
        gym.make(env_id, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_torchrl_gym_env_gives_pixels():
    import torch
    from torchrl.envs import GymEnv

    env = GymEnv("longdream/DistractingMemory-v0", length=4)
    td = env.rollout(3)
    assert td["pixels"].shape == (3, 64, 64, 3) and td["pixels"].dtype == torch.uint8


# ------------------------------------------------------------------------------------------ adapters


@pytest.mark.parametrize("module,env_id,kwargs,package", [
    ("bsuite", "longdream/BSuiteMemoryLen-v0", {}, "bsuite"),
    ("memory_maze", "longdream/MemoryMaze-v0", {}, "memory-maze"),
])
def test_missing_package_names_the_extra(monkeypatch, module, env_id, kwargs, package):
    for name in {module, f"{module}.tasks", *(m for m in sys.modules if m.startswith(module + "."))}:
        monkeypatch.setitem(sys.modules, name, None)  # as if the package were not installed
    with pytest.raises(ImportError) as e:
        gym.make(env_id, **kwargs)
    msg = str(e.value)
    assert "pip install 'longdream[memory]'" in msg and package in msg and "\n" not in msg


def test_bsuite_memory_len():
    pytest.importorskip("bsuite")
    env = gym.make("longdream/BSuiteMemoryLen-v0", memory_length=5)
    check_env(env.unwrapped, skip_render_check=True)
    assert env.observation_space.dtype == np.float32 and env.observation_space.shape == (3,)
    assert env.action_space == gym.spaces.Discrete(2)
    outs = [run(env, 7, lambda t: 0) for _ in range(2)]
    assert all(np.array_equal(x, y) for x, y in zip(outs[0]["obs"], outs[1]["obs"]))
    for out in outs:
        assert out["end"] == (True, False) and len(out["rewards"]) == 6
        assert out["rewards"][-1] in (-1.0, 1.0) and out["obs"][0].dtype == np.float32


def test_bsuite_discounting_chain():
    pytest.importorskip("bsuite")
    env = gym.make("longdream/BSuiteDiscountingChain-v0")
    check_env(env.unwrapped, skip_render_check=True)
    assert env.action_space == gym.spaces.Discrete(5)
    out = run(env, 0, lambda t: 2)  # the chain that pays after 10 steps
    assert out["end"] == (True, False) and len(out["rewards"]) == 100
    assert out["rewards"][9] > 0 and sum(r > 0 for r in out["rewards"]) == 1


@pytest.mark.slow
def test_memory_maze():
    pytest.importorskip("memory_maze")
    env = gym.make("longdream/MemoryMaze-v0", size=9)
    u = env.unwrapped
    try:
        out = run(env, 0, scripted(env), 5)
        assert env.action_space == gym.spaces.Discrete(6) and u.probe_split == (500, 100)
        assert all(o.shape == (64, 64, 3) and o.dtype == np.uint8 for o in out["obs"])
        probe = out["infos"][0]["probe"]
        assert probe["maze_layout"].shape == (9, 9) and set(np.unique(probe["maze_layout"])) <= {0.0, 1.0}
        assert probe["targets_pos"].shape[-1] == 2
        assert all(set(i["probe"]) == set(probe) for i in out["infos"])
    finally:
        env.close()


@pytest.mark.parametrize("env_id,kwargs", SMALL, ids=IDS)
@pytest.mark.parametrize("size", [16, 32])
def test_small_renderings_keep_every_tile(env_id, kwargs, size):
    """At obs_size 16 or 32 the same episode shows the same tiles: the colour at each tile's centre
    pixel equals the one at the 64 x 64 rendering (glyphs fill tiles of under 4 pixels, so skip glyph
    and agent tiles there), and rewards, actions and endings are identical."""
    big, small = gym.make(env_id, **kwargs), gym.make(env_id, obs_size=size, **kwargs)
    assert small.observation_space.shape == (size, size, 3)
    check_env(small.unwrapped, skip_render_check=True)
    a, b = run(big, 3, scripted(big)), run(small, 3, scripted(small))
    assert a["rewards"] == b["rewards"] and a["end"] == b["end"] and len(a["obs"]) == len(b["obs"])
    vb, vs = big.unwrapped.view, small.unwrapped.view
    centre = lambda v, i: v.offset + i * v.tile + v.tile // 2  # noqa: E731
    same = total = 0
    for x, y in zip(a["obs"], b["obs"]):
        for i in range(vb.n):
            for j in range(vb.n):
                total += 1
                same += bool((x[centre(vb, i), centre(vb, j)] == y[centre(vs, i), centre(vs, j)]).all())
    assert same / total > 0.9, same / total  # the rest: glyphs that fill small tiles, and the agent


def test_obs_size_must_be_supported():
    with pytest.raises(ValueError, match="obs_size must be one of 16, 32, 64"):
        gym.make("longdream/Rooms-v0", obs_size=20)


@pytest.mark.slow
def test_no_gym_notice_when_the_old_gym_is_installed():
    """memory-maze brings the old `gym`, which TorchRL imports whenever it is installed; importing envs
    first swallows gym's import-time notice, so a run prints none."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("gym") is None:
        pytest.skip("the old gym package is not installed")
    make = "from torchrl.envs import GymEnv; GymEnv('CartPole-v1')"  # TorchRL imports gym at its first env
    err = subprocess.run([sys.executable, "-c", "import envs; " + make], capture_output=True, text=True, check=True).stderr
    assert "unmaintained" not in err, err
    bare = subprocess.run([sys.executable, "-c", make], capture_output=True, text=True).stderr
    assert "unmaintained" in bare  # the notice this guards against is still there without it

"""The memory-probe suite: small, fast grid-world tasks that need long-term memory (64 x 64 RGB
observations, Discrete actions, a scripted data-collection policy and a recommended context/query split
for offline imagination), plus adapters for BSuite and Memory Maze (optional `memory` extra).

Importing this package registers the gymnasium ids below; the tasks truncate their own episodes.
"""
import gymnasium

from envs.memory.adapters import BSuiteDiscountingChain, BSuiteMemoryLen, MemoryMaze
from envs.memory.distracting import DistractingMemory
from envs.memory.doors_keys import MultiDoorsKeys
from envs.memory.rooms import Rooms, Teleport

TASKS = (
    "longdream/DistractingMemory-v0",
    "longdream/MultiDoorsKeys-v0",
    "longdream/Rooms-v0",
    "longdream/Teleport-v0",
)

_IDS = {
    "longdream/DistractingMemory-v0": ("envs.memory.distracting:DistractingMemory", {"length": 100}),
    "longdream/MultiDoorsKeys-v0": ("envs.memory.doors_keys:MultiDoorsKeys", {"keys": 3}),
    "longdream/Rooms-v0": ("envs.memory.rooms:Rooms", {"rooms": 4}),
    "longdream/Teleport-v0": ("envs.memory.rooms:Teleport", {"rooms": 4}),
    "longdream/BSuiteMemoryLen-v0": ("envs.memory.adapters:BSuiteMemoryLen", {"memory_length": 10}),
    "longdream/BSuiteDiscountingChain-v0": ("envs.memory.adapters:BSuiteDiscountingChain", {}),
    "longdream/MemoryMaze-v0": ("envs.memory.adapters:MemoryMaze", {"size": 9}),
}

for _id, (_entry, _kwargs) in _IDS.items():
    if _id not in gymnasium.envs.registry:
        gymnasium.register(id=_id, entry_point=_entry, kwargs=_kwargs)

__all__ = ["TASKS", "DistractingMemory", "MultiDoorsKeys", "Rooms", "Teleport", "BSuiteMemoryLen",
           "BSuiteDiscountingChain", "MemoryMaze"]

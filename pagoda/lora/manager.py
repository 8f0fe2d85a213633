"""The adapter pool: registered adapters (their weights on the host), `max_loras` resident
slots in the model's LoRA stacks, reference counts and LRU eviction.

Engine-thread state. Two counts per adapter:

- users: unfinished requests naming it (taken at enqueue, dropped when the request ends).
  An adapter with users cannot go away; unloading it then is deferred until its last
  request ends.
- pins: running requests (taken when the scheduler admits a request, dropped when it
  finishes or is preempted). A pinned adapter keeps its slot; an unpinned resident one may
  be evicted (least recently used first) to make room for another.

A request whose adapter cannot get a slot (every slot pinned) waits in the queue.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from pagoda.errors import InvalidRequestError, ModelNotFoundError
from pagoda.lora.adapter import LoRAAdapter, LoRAModelInfo, load_adapter

log = logging.getLogger("pagoda.lora")


@dataclass(frozen=True)
class UnloadResult:
    name: str
    deferred: int  # 0: unloaded now; else the requests it waits for


class LoRAManager:
    def __init__(self, model: Any, max_loras: int, max_rank: int) -> None:
        self.model = model
        self.max_loras, self.max_rank = max_loras, max_rank
        model.enable_lora(max_loras, max_rank)
        cfg = model.config
        self.info = LoRAModelInfo(model.lora_targets(), cfg.num_attention_heads, cfg.num_key_value_heads, max_rank)
        self.adapters: dict[str, LoRAAdapter] = {}
        self.users: dict[str, int] = {}
        self.pins: dict[str, int] = {}
        self.unloading: set[str] = set()
        self.slots: list[str | None] = [None] * max_loras
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self.loads = 0  # adapter weights copied into a slot (for stats and tests)
        self._uids = itertools.count(1)

    # ---- registry (load / unload) -----------------------------------------------------

    def read(self, name: str, path: str) -> LoRAAdapter:
        """Read and check an adapter's files (any thread: no pool state touched)."""
        return load_adapter(name, path, self.info)

    def add(self, adapter: LoRAAdapter) -> None:
        if adapter.name in self.adapters:
            raise InvalidRequestError(f"a LoRA adapter named {adapter.name!r} is already loaded", "lora_name")
        adapter.uid = next(self._uids)
        self.adapters[adapter.name] = adapter
        self.users.setdefault(adapter.name, 0)
        log.info("LoRA adapter %r loaded from %s (rank %d, %s)", adapter.name, adapter.path, adapter.rank,
                 ", ".join(adapter.modules))

    def remove(self, name: str) -> UnloadResult:
        if name not in self.adapters or name in self.unloading:
            raise InvalidRequestError(f"no LoRA adapter named {name!r} is loaded", "lora_name")
        users = self.users.get(name, 0)
        if users:
            self.unloading.add(name)
            return UnloadResult(name, users)
        self._drop(name)
        return UnloadResult(name, 0)

    def _drop(self, name: str) -> None:
        slot = self.resident.pop(name, None)
        if slot is not None:
            self.slots[slot] = None
            self.model.clear_lora(slot)
        del self.adapters[name]
        self.users.pop(name, None)
        self.pins.pop(name, None)
        self.unloading.discard(name)
        log.info("LoRA adapter %r unloaded", name)

    def names(self) -> list[str]:
        return [n for n in self.adapters if n not in self.unloading]

    def get(self, name: str) -> LoRAAdapter | None:
        return None if name in self.unloading else self.adapters.get(name)

    # ---- requests ---------------------------------------------------------------------

    def ref(self, name: str) -> int:
        """A request naming `name` was queued: its uid (the prefix cache's salt)."""
        adapter = self.get(name)
        if adapter is None:
            raise ModelNotFoundError(f"the LoRA adapter {name!r} does not exist (or is being unloaded)", "model")
        self.users[name] += 1
        return adapter.uid

    def unref(self, name: str) -> None:
        self.users[name] -= 1
        if self.users[name] == 0 and name in self.unloading:
            self._drop(name)

    def acquire(self, name: str) -> int | None:
        """Pin `name` in a slot for a running request: its slot, or None if every slot is pinned."""
        slot = self.resident.get(name)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            adapter = self.adapters[name]
            self.model.set_lora(slot, adapter.weights, 1.0)  # scalings are folded into B
            self.slots[slot] = name
            self.resident[name] = slot
            self.loads += 1
        self.resident.move_to_end(name)
        self.pins[name] = self.pins.get(name, 0) + 1
        return slot

    def release(self, name: str) -> None:
        self.pins[name] -= 1

    def _free_slot(self) -> int | None:
        if None in self.slots:
            return self.slots.index(None)
        for victim, slot in self.resident.items():  # least recently used first
            if not self.pins.get(victim):
                del self.resident[victim]
                self.slots[slot] = None
                return slot
        return None

    # ---- introspection ----------------------------------------------------------------

    def check_integrity(self, idle: bool) -> None:
        """Slots and counts agree; when no request is in flight, nothing is pinned or used."""
        for name, slot in self.resident.items():
            assert self.slots[slot] == name, f"slot {slot} holds {self.slots[slot]!r}, not {name!r}"
        assert sum(s is not None for s in self.slots) == len(self.resident), "slot table out of step"
        assert all(v >= 0 for v in self.pins.values()) and all(v >= 0 for v in self.users.values())
        if idle:
            assert not any(self.pins.values()), f"adapter slots still pinned: {self.pins}"
            assert not any(self.users.values()), f"adapters still referenced: {self.users}"
            assert not self.unloading, f"deferred unloads left: {self.unloading}"

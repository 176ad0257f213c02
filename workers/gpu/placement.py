"""Which free GPUs a count-only request gets: topology-aware, pure, and fast.

`Topology.of(inventory)` is computed once per inventory; `place` then runs under the
claim store's lock on each claim, given the ids free at that moment (whatever else makes
a GPU unavailable, such as a drain, is left out of `free` by the caller).

- N > 1 whole GPUs: a fully NVLink-connected set when one is free (`nvlink`), else the
  best-connected set on one NUMA node (`numa`), else the best-connected set (`any`).
  Among equally good sets, the one in the group with the fewest free GPUs: the larger
  free groups stay intact for later requests.
- 1 whole GPU: the lowest-index GPU of the smallest free NVLink-connected group
  (`packed`): on a host with two 4-GPU islands, four single jobs fill one island first.
- MIG instances of one profile (`mig`): on the GPU with the fewest free instances first.
- A GPU in MIG mode (`Gpu.mig_enabled`, with or without instances known) is given out
  by instance only, never whole to a count-only request (an exact request may still
  name it).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from sandfleet.workers.gpu.inventory import GpuInventory, MigDevice

# Subsets tried when looking for an NVLink clique in an island that is not one itself,
# after the greedy best-connected set (which finds the obvious ones) is not one.
MAX_CLIQUE_TRIES = 2000
# Seeds the greedy best-connected search starts from (bounds its cost on a huge host).
MAX_SEEDS = 16


@dataclass(frozen=True)
class Placement:
    ids: tuple[str, ...]  # GPU or MIG UUIDs, in the order chosen
    why: str  # nvlink | numa | any | packed | mig | exact


@dataclass(frozen=True)
class Topology:
    whole: tuple[str, ...]  # GPUs a count-only request may get whole, by index
    rank: dict[str, int]  # GPU UUID -> index
    peers: dict[str, frozenset[str]]
    numa: dict[str, int | None]
    islands: tuple[tuple[str, ...], ...]  # NVLink-connected components of `whole`
    complete: tuple[bool, ...]  # per island: every pair linked
    mig: dict[str, tuple[MigDevice, ...]]  # profile -> its instances
    parent: dict[str, str]  # every claimable id -> its physical GPU

    @classmethod
    def of(cls, inventory: GpuInventory) -> Topology:
        whole = tuple(gpu.uuid for gpu in inventory if not gpu.mig_enabled)
        peers = {gpu.uuid: frozenset(gpu.nvlink_peers) for gpu in inventory}
        islands = tuple(components(whole, peers))
        mig: dict[str, list[MigDevice]] = defaultdict(list)
        for instance in inventory.mig_devices():
            mig[instance.profile].append(instance)
        return cls(
            whole=whole,
            rank={gpu.uuid: gpu.index for gpu in inventory},
            peers=peers,
            numa={gpu.uuid: gpu.numa_node for gpu in inventory},
            islands=islands,
            complete=tuple(_edges(island, peers) == _pairs(len(island)) for island in islands),
            mig={profile: tuple(found) for profile, found in mig.items()},
            parent={
                **{gpu.uuid: gpu.uuid for gpu in inventory},
                **{m.uuid: m.parent for m in inventory.mig_devices()},
            },
        )


def components(ids: Iterable[str], peers: dict[str, frozenset[str]]) -> list[tuple[str, ...]]:
    """The NVLink-connected groups among `ids`, each in the order given."""
    ordered = list(ids)
    left, groups = set(ordered), []
    for start in ordered:
        if start not in left:
            continue
        group, frontier = {start}, [start]
        left.discard(start)
        while frontier:
            for peer in peers[frontier.pop()] & left:
                left.discard(peer)
                group.add(peer)
                frontier.append(peer)
        groups.append(tuple(i for i in ordered if i in group))
    return groups


def place(
    topology: Topology, free: Collection[str], count: int, mig_profile: str | None = None
) -> Placement | None:
    """`count` of the `free` ids, or None when too few are free."""
    if mig_profile is not None:
        return _place_mig(topology, free, count, mig_profile)
    if count == 1:
        return _place_one(topology, free)
    return (
        _on_nvlink(topology, free, count)
        or _on_numa(topology, free, count)
        or _best_connected(topology, [g for g in topology.whole if g in free], count, "any")
    )


def _place_one(topology: Topology, free: Collection[str]) -> Placement | None:
    groups = components((g for g in topology.whole if g in free), topology.peers)
    if not groups:
        return None
    smallest = min(groups, key=lambda group: (len(group), topology.rank[group[0]]))
    return Placement((smallest[0],), "packed")


def _on_nvlink(topology: Topology, free: Collection[str], count: int) -> Placement | None:
    fits = []
    for island, complete in zip(topology.islands, topology.complete, strict=True):
        members = [g for g in island if g in free]
        if len(members) < count:
            continue
        chosen = tuple(members[:count]) if complete else _clique(members, count, topology)
        if chosen is not None:
            fits.append((len(members), topology.rank[chosen[0]], chosen))
    return Placement(min(fits)[2], "nvlink") if fits else None


def _clique(members: list[str], count: int, topology: Topology) -> tuple[str, ...] | None:
    greedy = _best_connected(topology, members, count, "nvlink")
    if greedy is not None and _edges(greedy.ids, topology.peers) == _pairs(count):
        return greedy.ids
    tries = itertools.islice(itertools.combinations(members, count), MAX_CLIQUE_TRIES)
    for subset in tries:
        if _edges(subset, topology.peers) == _pairs(count):
            return subset
    return None


def _on_numa(topology: Topology, free: Collection[str], count: int) -> Placement | None:
    nodes: dict[int, list[str]] = defaultdict(list)
    for gpu in topology.whole:
        node = topology.numa[gpu]
        if gpu in free and node is not None:
            nodes[node].append(gpu)
    best = None
    for members in nodes.values():
        found = _best_connected(topology, members, count, "numa")
        if found is None:
            continue
        key = (-_edges(found.ids, topology.peers), len(members), topology.rank[found.ids[0]])
        if best is None or key < best[0]:
            best = (key, found)
    return best[1] if best else None


def _best_connected(
    topology: Topology, members: list[str], count: int, why: str
) -> Placement | None:
    """Greedy: from each seed, add the member with the most links into the set."""
    if len(members) < count:
        return None
    best: tuple[int, tuple[str, ...]] | None = None
    for seed in members[:MAX_SEEDS]:
        chosen = [seed]
        rest = [m for m in members if m != seed]
        inside = {seed}
        while len(chosen) < count:
            pick = max(rest, key=lambda m: (len(topology.peers[m] & inside), -topology.rank[m]))
            chosen.append(pick)
            inside.add(pick)
            rest.remove(pick)
        edges = _edges(chosen, topology.peers)
        if best is None or edges > best[0]:
            best = (edges, tuple(sorted(chosen, key=topology.rank.__getitem__)))
        if best[0] == _pairs(count):
            break
    assert best is not None
    return Placement(best[1], why)


def _place_mig(
    topology: Topology, free: Collection[str], count: int, profile: str
) -> Placement | None:
    instances = [m for m in topology.mig.get(profile, ()) if m.uuid in free]
    if len(instances) < count:
        return None
    free_on: dict[str, int] = defaultdict(int)
    for uuid in free:
        if uuid != topology.parent.get(uuid, uuid):
            free_on[topology.parent[uuid]] += 1
    instances.sort(key=lambda m: (free_on[m.parent], topology.rank[m.parent], m.cdi_name))
    return Placement(tuple(m.uuid for m in instances[:count]), "mig")


def _edges(ids: Iterable[str], peers: dict[str, frozenset[str]]) -> int:
    chosen = list(ids)
    return sum(len(peers[g].intersection(chosen)) for g in chosen) // 2


def _pairs(count: int) -> int:
    return count * (count - 1) // 2

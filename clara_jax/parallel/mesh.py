"""Device mesh construction: named axes sized per slice (ICI) and across slices (DCN).

Axes are listed from least to most communication-intensive (data, fsdp, tensor), so the
innermost, fastest links carry the chattiest collectives. One size may be -1 and is inferred
from the device count, which lets the same config run on a laptop and on a pod.

Meshes are built with `AxisType.Auto` on every axis: we resolve shardings ourselves and let
GSPMD propagate them, whereas `jax.make_mesh` now defaults to Explicit sharding-in-types.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AxisSizes = tuple[tuple[str, int], ...]

DEFAULT_AXES: AxisSizes = (("data", -1), ("fsdp", 1), ("tensor", 1))


def _normalize(pairs, what: str) -> AxisSizes:
    """Accept lists (JSON/YAML/ml_collections) as well as tuples, and check each pair."""
    out = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"{what}: expected (name, size) pairs, got {pair!r}")
        name, size = pair
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what}: axis name must be a non-empty string, got {name!r}")
        size = int(size)
        if size < 1 and size != -1:
            raise ValueError(f"{what}: axis {name!r} has size {size}; use a positive size or -1")
        out.append((name, size))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: duplicate axis names in {names}")
    if sum(s == -1 for _, s in out) > 1:
        raise ValueError(f"{what}: at most one axis may be -1, got {_fmt(out)}")
    return tuple(out)


def _fmt(pairs) -> str:
    return ",".join(f"{n}={s}" for n, s in pairs)


def _resolve(pairs: AxisSizes, total: int, unit: str) -> tuple[int, ...]:
    """Fill in the -1 so that the sizes multiply to `total`."""
    known = math.prod(s for _, s in pairs if s != -1)
    has_free = any(s == -1 for _, s in pairs)
    if total % known or (not has_free and known != total):
        raise ValueError(
            f"mesh shape {_fmt(pairs)} (product {known}) does not "
            f"{'divide' if has_free else 'match'} the {total} available {unit}"
        )
    return tuple(total // known if s == -1 else s for _, s in pairs)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axes as (name, size) pairs, in order of increasing communication intensity.

    `axes` are sizes within one slice (ICI); `dcn_axes` optionally gives, for some of those
    names, how many slices (or, on GPUs, processes) the axis also spans. The mesh size of an
    axis is the ICI size times the DCN size.
    """

    axes: AxisSizes = DEFAULT_AXES
    dcn_axes: AxisSizes = ()
    allow_split_physical_axes: bool = False

    def __post_init__(self):
        object.__setattr__(self, "axes", _normalize(self.axes, "mesh axes"))
        object.__setattr__(self, "dcn_axes", _normalize(self.dcn_axes, "mesh dcn_axes"))
        unknown = sorted({n for n, _ in self.dcn_axes} - set(self.axis_names))
        if unknown:
            raise ValueError(f"dcn_axes name(s) {unknown} are not mesh axes {list(self.axis_names)}")

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.axes)

    @classmethod
    def from_spec(cls, spec: str, dcn_spec: str = "", **kw) -> MeshConfig:
        """Parse 'data=2,fsdp=2,tensor=2' (order kept; '-1' infers one size) for configs/CLI."""
        return cls(axes=_parse_spec(spec), dcn_axes=_parse_spec(dcn_spec), **kw)

    def resolve(self, num_devices: int, num_granules: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(ICI shape, DCN shape), one entry per axis, for this many devices and slices."""
        if not self.uses_dcn(num_granules):
            return _resolve(self.axes, num_devices, "devices"), (1,) * len(self.axes)
        if num_devices % num_granules:
            raise ValueError(f"{num_devices} devices do not split evenly into {num_granules} slices")
        dcn_map = dict(self.dcn_axes)
        dcn_pairs = tuple((n, dcn_map.get(n, 1)) for n in self.axis_names)
        dcn = _resolve(dcn_pairs, num_granules, "slices")
        ici = _resolve(self.axes, num_devices // num_granules, "devices per slice")
        return ici, dcn

    def uses_dcn(self, num_granules: int = 1) -> bool:
        """A hybrid mesh is needed when some DCN size is > 1 (or inferred over > 1 slices)."""
        return any(s > 1 or (s == -1 and num_granules > 1) for _, s in self.dcn_axes)


def _parse_spec(spec: str) -> AxisSizes:
    pairs = []
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, size = item.partition("=")
        if not sep:
            raise ValueError(f"mesh spec {spec!r}: expected name=size, got {item!r}")
        try:
            pairs.append((name.strip(), int(size)))
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size of {name.strip()!r} is not an integer") from None
    return tuple(pairs)


def _granules(devices: Sequence) -> tuple[int, bool]:
    """Number of DCN granules and whether they are processes: TPU slices when the devices span
    several slices, else hosts (multi-node GPU, or CPU processes, whose devices all report
    slice 0)."""
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        return len(slices), False
    return len({d.process_index for d in devices}), True


def num_slices(devices: Sequence | None = None) -> int:
    """How many TPU slices the devices span (1 off TPU pods of several slices)."""
    devices = list(jax.devices() if devices is None else devices)
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(cfg: MeshConfig, devices: Sequence | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: no devices")
    num_granules, process_is_granule = _granules(devices)
    ici, dcn = cfg.resolve(len(devices), num_granules)
    if any(s > 1 for s in dcn):
        grid = mesh_utils.create_hybrid_device_mesh(
            ici,
            dcn,
            devices,
            process_is_granule=process_is_granule,
            allow_split_physical_axes=cfg.allow_split_physical_axes,
        )
    else:
        grid = mesh_utils.create_device_mesh(
            ici, devices, allow_split_physical_axes=cfg.allow_split_physical_axes
        )
    names = cfg.axis_names
    return Mesh(np.asarray(grid), names, axis_types=(AxisType.Auto,) * len(names))


def describe(mesh: Mesh) -> str:
    """One line for logs, e.g. 'data=2 fsdp=2 tensor=2 (8 cpu devices, auto)'."""
    axes = " ".join(f"{n}={s}" for n, s in mesh.shape.items())
    kinds = sorted({t.name.lower() for t in mesh.axis_types})
    platform = mesh.devices.flat[0].platform
    return f"{axes} ({mesh.devices.size} {platform} devices, {'/'.join(kinds)})"

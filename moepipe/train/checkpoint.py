"""Checkpoints: torch.distributed.checkpoint (DCP) shards plus a JSON manifest, written so that a
crash at any moment leaves the latest complete checkpoint loadable.

On disk (`train.ckpt_dir`, default <run dir>/ckpt):

    step_N.tmp/   a write in progress: DCP files, then manifest.json
    step_N/       the same directory, renamed once complete
    latest        "step_N", replaced (write + rename) only after that rename

State is one flat dict of tensors keyed by global names, so a checkpoint written under one layout
(pp, ep, dp, plan) loads under any other: each rank asks DCP for the keys it holds.

    model.<fqn>                parameters and persistent buffers (the routers' expert_bias)
    optim.<fqn>.<slot>         AdamW state (exp_avg, exp_avg_sq, step)
    rng.<rank>.<cpu|cuda>      each rank's torch RNG (router jitter); restored under the same mesh
    placer.<name>              the placer's statistics (identical on every rank)

Data order and learning rate are pure functions of (seed, step), so the step restores them.
Dense weights are replicated over EP/DP ranks; DCP's save planner writes each key once.
Under tensor parallelism the split weights and their AdamW moments are DTensors: DCP stores
them by global shape and offsets, so tp2 loads tp1 checkpoints and the reverse (resharding).

No arbitrary unpickling: DCP reads tensor data with torch.load(weights_only=True), and its
`.metadata` file, a pickle, is read here with an unpickler that admits only DCP's metadata
classes, torch dtypes and sizes. The manifest (JSON) holds step, mesh, plan, config and a sha256
of every file, verified before anything is read.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from moepipe.config import ConfigError, MoepipeConfig
from moepipe.parallel.tensor_parallel import is_sharded

FORMAT = "moepipe-checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"
METADATA = ".metadata"

# Model fields that decide parameter names and shapes: a checkpoint loads only into the same.
_SHAPE_FIELDS = {
    "model": ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "tie_embeddings"),
    "moe": ("num_experts", "expert_hidden", "every", "first_dense", "num_shared_experts", "shared_expert_hidden"),
}


# ----------------------------------------------------------------------------- the trainer's state


def modules_of(trainer) -> list[torch.nn.Module]:
    """The modules this process holds: DistributedTrainer.modules (by stage) or Trainer.model.
    Read at every call: migration replaces them."""
    mods = getattr(trainer, "modules", None)
    return list(mods.values()) if isinstance(mods, dict) else [trainer.model]


def mesh_of(trainer) -> tuple[int, int, int, int]:
    """(rank, pp, ep, dp) of this process; a single-process trainer is rank 0 of (1, 1, 1)."""
    mesh = getattr(trainer, "mesh", None)
    if mesh is None:
        return 0, 1, 1, 1
    return mesh.rank, mesh.pp, mesh.ep, mesh.dp


def mesh_dict(trainer) -> dict[str, int]:
    """The manifest's mesh: {"pp", "ep", "dp"}, plus "tp" under tensor parallelism (so tp1
    manifests read as before)."""
    _, pp, ep, dp = mesh_of(trainer)
    tp = getattr(getattr(trainer, "mesh", None), "tp", 1)
    return {"pp": pp, "ep": ep, "dp": dp, **({"tp": tp} if tp > 1 else {})}


def _distributed(trainer) -> bool:
    return getattr(trainer, "mesh", None) is not None and dist.is_available() and dist.is_initialized()


def named_parameters(trainer) -> dict[str, torch.nn.Parameter]:
    out: dict[str, torch.nn.Parameter] = {}
    for module in modules_of(trainer):
        out.update(module.named_parameters())
    return out


def state_to_save(trainer) -> dict[str, torch.Tensor]:
    """This rank's part of the flat state (tensors only; see the module docstring)."""
    rank = mesh_of(trainer)[0]
    state: dict[str, torch.Tensor] = {}
    for module in modules_of(trainer):
        for name, t in module.state_dict().items():
            state[f"model.{name}"] = t
    params = named_parameters(trainer)
    opt_state = trainer.optimizer.state
    for name, p in params.items():
        for slot, value in opt_state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                state[f"optim.{name}.{slot}"] = value
    state[f"rng.{rank}.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and getattr(trainer, "device", torch.device("cpu")).type == "cuda":
        state[f"rng.{rank}.cuda"] = torch.cuda.get_rng_state()
    for key, t in trainer.placer_state().items():
        state[f"placer.{key}"] = t.detach().cpu().contiguous()
    return state


# ----------------------------------------------------------------------------- small collectives


@contextlib.contextmanager
def _quiet(on: bool):
    """DCP warns that it assumes one process even when told so (no_dist=True): silence that."""
    with warnings.catch_warnings():
        if not on:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _barrier(on: bool) -> None:
    if on:
        dist.barrier()


def _agree(error: Optional[str], on: bool) -> Optional[str]:
    """The first rank's error, on every rank: a check failing on one rank must stop them all
    before DCP's collectives, or the others would wait for it until the collective timeout."""
    if not on:
        return error
    errors: list[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


# ----------------------------------------------------------------------------- files


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durably(path: str, text: str) -> None:
    """Write to path.tmp, fsync, rename over path: readers see the old or the new file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def checkpoint_root(cfg: MoepipeConfig, run_dir: str) -> str:
    return cfg.train.ckpt_dir or os.path.join(run_dir, "ckpt")


def step_dirs(root: str) -> dict[int, str]:
    """Complete checkpoints in `root` by step (directories named step_N, no .tmp)."""
    out = {}
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith("step_") and name[5:].isdigit() and os.path.isdir(os.path.join(root, name)):
                out[int(name[5:])] = os.path.join(root, name)
    return out


def latest_checkpoint(root: str) -> Optional[str]:
    """The directory `root/latest` names, or None when there is no pointer."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    aside = path + ".old.tmp"
    if name.startswith("step_") and "/" not in name and not os.path.isdir(path) and os.path.isdir(aside):
        # save() died between moving an older copy of this step aside and renaming the new one
        # in: the copy `latest` named is intact, under its aside name. Put it back.
        os.rename(aside, path)
    if not name.startswith("step_") or "/" in name or not os.path.isdir(path):
        raise ConfigError(
            f"train.ckpt_dir={root} has a latest pointer naming {name!r}, which is not a checkpoint there: "
            "point train.resume at an intact step_N directory, or set train.resume=never with a new train.ckpt_dir"
        )
    return path


def attempt_number() -> int:
    """0 for a job's first attempt, then 1, 2, ...: set by moepipe's launcher (MOEPIPE_RESTART)
    or by torchrun (TORCHELASTIC_RESTART_COUNT)."""
    return int(os.environ.get("MOEPIPE_RESTART") or os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def _inject_kill_during_write(rank: int, step: int) -> None:
    """Test hook: MOEPIPE_INJECT_CKPT_KILL="<rank>:<step>[:<attempt>]" SIGKILLs that rank after
    the shards of step's checkpoint are written but before it is renamed into place."""
    spec = os.environ.get("MOEPIPE_INJECT_CKPT_KILL")
    if not spec:
        return
    parts = [int(x) for x in spec.split(":")]
    attempt = parts[2] if len(parts) > 2 else 0
    if parts[0] == rank and parts[1] == step and attempt == attempt_number():
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- save


def save_checkpoint(trainer, cfg: MoepipeConfig, root: str, step: int, config_dict: Optional[dict] = None) -> str:
    """Write step's checkpoint (collective on distributed trainers); return its directory."""
    on = _distributed(trainer)
    rank = mesh_of(trainer)[0]
    final = os.path.join(root, f"step_{step}")
    tmp = f"{final}.tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a write that died before: never renamed, never pointed to
        os.makedirs(tmp)
    _barrier(on)
    started = time.perf_counter()
    with _quiet(on):
        dcp.save(state_to_save(trainer), storage_writer=FileSystemWriter(tmp), no_dist=not on)
    # Each rank hashes the shards it wrote (DCP names them __<rank>_*), so the hashing I/O is spread.
    mine = {name: _sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp)) if name.startswith(f"__{rank}_")}
    if on:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    else:
        parts = [mine]
    _inject_kill_during_write(rank, step)
    if rank == 0:
        files = {name: digest for part in parts for name, digest in part.items()}
        files[METADATA] = _sha256(os.path.join(tmp, METADATA))
        plan = getattr(trainer, "plan", None)
        manifest = {
            "format": FORMAT,
            "step": step,
            "mesh": mesh_dict(trainer),
            "placer": cfg.placer.name,
            "plan": json.loads(plan_to_json(plan)) if plan is not None else None,
            "config": config_dict,
            "files": files,
            "torch": torch.__version__,
            "written_at": time.time(),
            "seconds": time.perf_counter() - started,
        }
        _write_durably(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1) + "\n")
        old = final + ".old.tmp"  # the .tmp suffix: prune() clears it if we die before that
        if os.path.exists(final):
            # An earlier copy of this step (an attempt that died before updating `latest`, or a
            # run resumed from an older checkpoint that `latest` may still name): move it aside,
            # never delete it, until the new copy is in place and `latest` names it.
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_durably(os.path.join(root, LATEST), f"step_{step}\n")
        shutil.rmtree(old, ignore_errors=True)
        prune(root, cfg.train.ckpt_keep)
    _barrier(on)  # nobody runs ahead (or exits) before the checkpoint is in place
    return final


def plan_to_json(plan) -> str:
    from moepipe.placement.plan import to_json

    return to_json(plan)


def prune(root: str, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (never the one `latest` names) and
    any stale .tmp directories."""
    latest = latest_checkpoint(root)
    for name in os.listdir(root):
        if name.endswith(".tmp") and name.startswith("step_") and os.path.isdir(os.path.join(root, name)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep <= 0:
        return
    steps = sorted(step_dirs(root).items())
    for _, path in steps[:-keep]:
        if path != latest:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- reading safely


_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to torch.strided etc.
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes, torch dtypes and sizes; any other global is refused, so a
    crafted .metadata cannot run code (pickle calls only what find_class hands it)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in checkpoint metadata")


def read_metadata(path: str) -> Metadata:
    """DCP's metadata of the checkpoint at `path`, unpickled safely (ConfigError when unreadable)."""
    try:
        with open(os.path.join(path, METADATA), "rb") as f:
            md = _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
        raise ConfigError(f"checkpoint {path} has unreadable DCP metadata ({err}): resume from another checkpoint or set train.resume=never") from None
    if not isinstance(md, Metadata):
        raise ConfigError(f"checkpoint {path} has DCP metadata of type {type(md).__name__}: resume from another checkpoint")
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", "")
        if not rel or os.path.isabs(rel) or os.sep in rel or rel.startswith(".."):
            raise ConfigError(f"checkpoint {path} metadata names a file outside the checkpoint ({rel!r}): resume from another checkpoint")
    return md


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata goes through `read_metadata` (no arbitrary unpickling)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank is not None:
            raise ConfigError(f"checkpoint {self.path} asks for rank-local metadata (__{rank}.metadata), which moepipe never writes")
        md = read_metadata(str(self.path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = getattr(self, "load_id", None)
        return md


def read_manifest(path: str) -> dict:
    """The manifest of the checkpoint directory `path` (ConfigError when missing or broken)."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise ConfigError(
            f"checkpoint {path} has no {MANIFEST} (not a moepipe checkpoint, or its write never finished): "
            "give a step_N directory that train.ckpt_every wrote, or set train.resume=never"
        )
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"checkpoint {path} has a corrupt {MANIFEST} ({err}): resume from an older step_N with train.resume=<dir>") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("step"), int):
        raise ConfigError(f"checkpoint {path} has a {MANIFEST} that is not {FORMAT}: resume from a checkpoint this moepipe wrote")
    if not isinstance(manifest.get("files"), dict) or METADATA not in manifest["files"]:
        raise ConfigError(f"checkpoint {path} has a {MANIFEST} without file checksums: resume from another checkpoint")
    return manifest


def verify_files(path: str, manifest: dict, share: int = 0, shares: int = 1) -> None:
    """Compare sha256 of this rank's share of the files with the manifest (every file when
    shares == 1); the metadata is checked by everyone, since everyone reads it."""
    names = sorted(manifest["files"])
    mine = [n for i, n in enumerate(names) if i % shares == share or n == METADATA]
    for name in mine:
        fpath = os.path.join(path, name)
        if os.sep in name or name.startswith("..") or not os.path.isfile(fpath):
            raise ConfigError(f"checkpoint {path} is missing {name}: resume from an older step_N with train.resume=<dir>")
        if _sha256(fpath) != manifest["files"][name]:
            raise ConfigError(
                f"checkpoint {path} is corrupt ({name} does not match its sha256 in {MANIFEST}): "
                "resume from an older step_N with train.resume=<dir>"
            )


# ----------------------------------------------------------------------------- resume


@dataclass
class ResumePoint:
    path: str
    manifest: dict

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def _explicit(path: str) -> str:
    """train.resume=<path>: a step_N directory, a ckpt dir (with latest), or a run dir."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    for root in (path, os.path.join(path, "ckpt")):
        found = latest_checkpoint(root)
        if found:
            return found
    raise ConfigError(
        f"train.resume={path} holds no checkpoint (no {MANIFEST}, no latest pointer): "
        "give a step_N directory, a ckpt dir or a run dir with ckpt/latest"
    )


def find_resume(cfg: MoepipeConfig, run_dir: str) -> Optional[ResumePoint]:
    """Where this run resumes from (None: from scratch), per train.resume."""
    mode, root = cfg.train.resume, checkpoint_root(cfg, run_dir)
    if mode == "never":
        existing = latest_checkpoint(root)
        if existing:
            raise ConfigError(
                f"train.resume=never but {root} already holds checkpoints (latest {os.path.basename(existing)}): "
                "use train.resume=auto to continue them, or a new run dir / train.ckpt_dir"
            )
        return None
    path = latest_checkpoint(root) if mode == "auto" else _explicit(mode)
    if path is None:
        return None
    point = ResumePoint(path, read_manifest(path))
    _check_config(point, cfg)
    if point.step >= cfg.train.steps:
        raise ConfigError(
            f"train.steps={cfg.train.steps} but checkpoint {path} is already at step {point.step}: "
            "raise train.steps to train further, or set train.resume=never with a new run dir"
        )
    return point


def _check_config(point: ResumePoint, cfg: MoepipeConfig) -> None:
    saved = point.manifest.get("config") or {}
    for group, fields in _SHAPE_FIELDS.items():
        old = saved.get(group) or {}
        for name in fields:
            now = getattr(getattr(cfg, group), name)
            if name in old and old[name] != now:
                raise ConfigError(
                    f"{group}.{name}={now} but checkpoint {point.path} was written with {group}.{name}={old[name]}: "
                    f"set {group}.{name}={old[name]} to resume, or train.resume=never"
                )


def plan_for_resume(point: Optional[ResumePoint], cfg: MoepipeConfig):
    """The checkpoint's plan when this job can run it (same mesh, same placer, a stage placement
    the schedule accepts); else None: the trainer makes its default plan and loading reshards."""
    if point is None or point.manifest.get("plan") is None or point.manifest.get("placer") != cfg.placer.name:
        return None
    from moepipe.config import moe_layer_ids
    from moepipe.placement.plan import from_json, validate_plan
    from moepipe.train.distributed import check_plan_for_job

    try:
        plan = from_json(json.dumps(point.manifest["plan"]))
        validate_plan(plan, cfg.model.n_layers, moe_layer_ids(cfg.model, cfg.moe), cfg.moe.num_experts)
        return check_plan_for_job(plan, cfg)
    except (ConfigError, KeyError, TypeError, ValueError):
        return None


def load_checkpoint(trainer, point: ResumePoint, cfg: MoepipeConfig) -> int:
    """Load `point` into the trainer (collective on distributed trainers); return its step."""
    on = _distributed(trainer)
    rank = mesh_of(trainer)[0]
    world = dist.get_world_size() if on else 1
    error, state, slots, rng_keys, placer_keys = None, {}, {}, {}, []
    try:
        verify_files(point.path, point.manifest, rank, world)
        md = read_metadata(point.path)
        same_mesh = point.manifest.get("mesh") == mesh_dict(trainer)
        state, slots, rng_keys, placer_keys = _targets(trainer, md, point.path, same_mesh)
    except ConfigError as err:
        error = str(err)
    error = _agree(error, on)
    if error:
        raise ConfigError(error)
    with _quiet(on):
        dcp.load(state, storage_reader=SafeReader(point.path), no_dist=not on)
    for p, slot_state in slots.items():
        trainer.optimizer.state[p] = slot_state
    if rng_keys:
        torch.set_rng_state(state[rng_keys["cpu"]])
        if "cuda" in rng_keys:
            torch.cuda.set_rng_state(state[rng_keys["cuda"]])
    else:
        # Another mesh: the old per-rank streams do not map onto the new ranks. Reseed from
        # (seed, step, rank) so the run stays reproducible; only router jitter draws from it.
        # The ranks of one TP group share a stream: each routes all tokens and must draw alike.
        mesh = getattr(trainer, "mesh", None)
        stream = mesh.slot if mesh is not None else rank
        torch.manual_seed(cfg.train.seed * 1_000_003 + point.step * 7919 + stream)
    if placer_keys:
        trainer.load_placer_state({k[len("placer."):]: state[k] for k in placer_keys})
    return point.step


def _expect(md: Metadata, path: str, key: str, shape: torch.Size) -> TensorStorageMetadata:
    entry = md.state_dict_metadata.get(key)
    if entry is None:
        raise ConfigError(
            f"checkpoint {path} has no {key}: it was written for another model; resume with that checkpoint's "
            "model.*/moe.* settings or set train.resume=never"
        )
    if not isinstance(entry, TensorStorageMetadata) or tuple(entry.size) != tuple(shape):
        got = tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else type(entry).__name__
        raise ConfigError(f"checkpoint {path} holds {key} as {got}, this model needs {tuple(shape)}: resume with the checkpoint's model.*/moe.* settings")
    return entry


def _targets(trainer, md: Metadata, path: str, same_mesh: bool):
    """Tensors DCP loads into, in place: the model's own, fresh optimizer slots, RNG and placer."""
    rank = mesh_of(trainer)[0]
    state: dict[str, torch.Tensor] = {}
    for module in modules_of(trainer):
        for name, t in module.state_dict().items():
            _expect(md, path, f"model.{name}", t.shape)
            state[f"model.{name}"] = t
    slots: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
    saved = md.state_dict_metadata
    # No optimizer state at all: saved before any update was taken (e.g. every step skipped).
    stepped = any(k.startswith("optim.") for k in saved)
    for name, p in named_parameters(trainer).items():
        prefix = f"optim.{name}."
        keys = [k for k in saved if k.startswith(prefix) and "." not in k[len(prefix):]]
        if not stepped:
            continue
        if not keys:
            raise ConfigError(f"checkpoint {path} has no optimizer state for {name}: resume from a checkpoint written after a step")
        slots[p] = {}
        for key in keys:
            entry = saved[key]
            if not isinstance(entry, TensorStorageMetadata):
                raise ConfigError(f"checkpoint {path} holds {key} as {type(entry).__name__}, not a tensor: resume from another checkpoint")
            slot = key[len(prefix):]
            # AdamW keeps `step` as a CPU scalar unless capturable/fused; moments live with the weight.
            device = torch.device("cpu") if slot == "step" else p.device
            t = torch.zeros(tuple(entry.size), dtype=entry.properties.dtype, device=device)
            if slot != "step" and t.shape == p.shape and is_sharded(p):
                t = torch.zeros_like(p, dtype=entry.properties.dtype)  # a TP shard: DCP reads this rank's part
            if slot != "step" and t.shape != p.shape:
                raise ConfigError(f"checkpoint {path} holds {key} as {tuple(t.shape)}, the weight is {tuple(p.shape)}: resume with the checkpoint's model.*/moe.* settings")
            slots[p][slot] = state[key] = t
    rng_keys = {}
    if same_mesh and f"rng.{rank}.cpu" in saved:
        rng_keys["cpu"] = f"rng.{rank}.cpu"
        if getattr(trainer, "device", torch.device("cpu")).type == "cuda" and f"rng.{rank}.cuda" in saved:
            rng_keys["cuda"] = f"rng.{rank}.cuda"
        for key in rng_keys.values():
            entry = saved[key]
            state[key] = torch.zeros(tuple(entry.size), dtype=entry.properties.dtype)
    placer_keys = []
    for key, entry in saved.items():
        if key.startswith("placer.") and isinstance(entry, TensorStorageMetadata):
            state[key] = torch.zeros(tuple(entry.size), dtype=entry.properties.dtype)
            placer_keys.append(key)
    return state, slots, rng_keys, placer_keys

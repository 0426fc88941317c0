"""Resumable training of the denoiser (SPEC §1).

Training state lives in the output folder: `model.safetensors` + `model.json` (the checkpoint),
`train_state.safetensors` (Adam moments and the noise generator, as tensors: state.py),
`train_log.jsonl` (one line per log interval) and `curve/step-NNNNNNN.safetensors` (log-spaced
snapshots for the learning curve), and with `ema` > 0 `ema.safetensors`, an exponential moving
average of the weights (a checkpoint of its own: at a constant lr the last weights wander, their
average is usually the better denoiser). Killing a run loses at most the steps since the last save.
A resume in the same folder continues the weights, Adam's moments and the noise/augmentation
stream exactly; the data order is re-seeded from the step (the loader's shuffle buffer is not
saved), so it is a statistically equivalent continuation, not a bit-exact replay.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.model.config import preset
from phisearch.indexer.model.embedder import pick_device
from phisearch.indexer.model.heap import keep_freed_memory
from phisearch.indexer.model.phi import as_float
from phisearch.indexer.model.unet import UNet
from phisearch.indexer.sources.loader import first_samples, loader
from phisearch.indexer.sources.records import Batch
from phisearch.indexer.sources.shards import expand
from phisearch.indexer.train.denoise_eval import denoise_eval
from phisearch.indexer.train.schedule import (  # noqa: F401 - SIGMA_DISTS re-exported for the CLI
    SIGMA_DISTS,
    LrSchedule,
    downscale,
    sample_sigmas,
)
from phisearch.indexer.train.speed import StepMode, mode_from, probe
from phisearch.indexer.train.state import dataset_size, load_state, save_state
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

log = logging.getLogger(__name__)

# The clock a step's CPU time is read from (the process's, all threads). Tests put a counting
# clock here, so that CPU accounting is checked by value on a fast host and a slow one alike.
cpu_clock: Callable[[], float] = time.process_time


@dataclass(frozen=True)
class TrainConfig:
    data: tuple[str, ...]                 # training shards (paths / brace patterns)
    out: str                              # output folder (checkpoint, state, log, curve)
    preset: str = "small64"               # network preset (config.PRESETS)
    batch_size: int = 32                  # small on CPU: more steps per minute
    lr: float = 1e-3                      # Adam learning rate (SPEC §1)
    halve_every_epochs: float = 100.0     # lr halves every this many epochs (SPEC: 100)
    max_steps: int | None = None          # stop after this many steps in total ...
    minutes: float | None = None          # ... or after this many minutes in this run
    workers: int = 1                      # loader processes decoding JPEGs
    seed: int = 0                         # init, shuffling and noise
    test_data: tuple[str, ...] = ()       # shard(s) for periodic PSNR
    eval_images: int = 256                # test images used for periodic PSNR
    save_every_minutes: float = 3.0       # checkpoint interval
    eval_every_minutes: float = 10.0      # periodic PSNR interval
    device: str = "auto"                  # auto | cpu | cuda
    dtype: str = "auto"                   # auto (probe on CPU, bf16 on CUDA) | fp32 | bf16
    channels_last: bool | None = None     # None: probed with dtype on CPU, on for CUDA
    compile: bool | None = None           # torch.compile; None: on CUDA, and on a CPU for runs
                                          # of 10+ minutes (Trainer._long_run)
    resident: bool = False                # decode the training set once onto the device
    init_from: str | None = None          # warm start from this checkpoint (no optimizer state)
    sigma_dist: str = "paper"             # paper (√σ uniform on [0, 1]) | uniform | focus
    lr_schedule: str = "halve"            # halve (SPEC) | cosine | linear (schedule.LrSchedule)
    warmup_steps: int = 0                 # linear lr warm-up (a warm restart wants one)
    schedule_steps: int | None = None     # cosine / linear: planned steps from the run's start
    resolution: int = 64                  # train on images area-downscaled to this side
    ema: float = 0.0                      # decay of the weights' moving average (0: none)
    curve_steps: tuple[int, ...] = field(default_factory=lambda: tuple(
        sorted({int(m * 10 ** e) for e in range(7) for m in (1, 2, 5)} | {0})))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and random 64x64 crops of a 4-px reflect-padded image, done
    where x is (CPU or GPU); the few random numbers come from `generator` (CPU)."""
    n, _, h, w = x.shape
    dev = x.device
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    pad = 4
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    rows = (dy.view(-1, 1) + torch.arange(h, device=dev)).view(n, 1, h, 1)
    xp = xp.gather(2, rows.expand(n, x.shape[1], h, w + 2 * pad))
    cols = (dx.view(-1, 1) + torch.arange(w, device=dev)).view(n, 1, 1, w)
    return xp.gather(3, cols.expand(n, x.shape[1], h, w))


def loss_fn(model: UNet, x: torch.Tensor, sigma: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors per image, averaged over the batch (SPEC §1)."""
    y = x + sigma.view(-1, 1, 1, 1) * z
    return (model(y).float() - x).pow(2).sum((1, 2, 3)).mean()


def load_images(urls: list[str], limit: int):
    """The first `limit` decodable images of the shards, in order: (N, 64, 64, 3) uint8."""
    import numpy as np

    return np.stack([s.image for s in first_samples(urls, limit)])


class Trainer:
    """One run: the model, Adam, the counters and the noise generator, saved and restored
    together. `train()` drives it; each method is one named step of the loop."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "curve").mkdir(exist_ok=True)
        self.ckpt_path, self.state_path = self.out / "model.safetensors", \
            self.out / "train_state.safetensors"
        self.device = pick_device(cfg.device)
        keep_freed_memory()   # half the CPU time went to page faults without it (heap.py)
        torch.manual_seed(cfg.seed)
        self.urls = expand(cfg.data)
        self.n_data = dataset_size(self.urls)
        # seconds: wall time inside the steps (a SIGSTOP'd process keeps counting);
        # cpu_seconds: the process's CPU time in them (all threads), counted from cpu_from_step.
        self.state = {"step": 0, "images": 0, "seconds": 0.0, "runs": 0, "cpu_seconds": 0.0,
                      "cpu_from_step": None, "schedule_start": None, "warm_start_from": None}
        self.history: list[dict] = []
        self.weights_info: dict = {}      # the resumed model.json (_counters_follow_the_weights)
        self.ema_steps: int | None = None  # the step the resumed ema.safetensors was saved at
        self.model, self.preset_name = self._load_model()
        self.ema = self._load_ema() if cfg.ema > 0 else None
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.gen = torch.Generator()
        restored = False
        if self.ckpt_path.exists() and self.state_path.exists():
            meta = load_state(self.state_path, self.opt, self.gen)
            restored = meta.pop("generator_restored", False)
            self.state.update(meta)
            self._counters_follow_the_weights()
        if self.state["cpu_from_step"] is None:   # a run (or state) from before CPU accounting
            self.state["cpu_from_step"] = self.state["step"]
        if self.state.get("schedule_start") is None:   # the planned run starts here
            self.state["schedule_start"] = self.state["step"]
        self.schedule = LrSchedule(cfg.lr_schedule, cfg.lr, cfg.warmup_steps, cfg.schedule_steps,
                                   self.state["schedule_start"], cfg.halve_every_epochs)
        if not restored:   # a new run, a warm start, or a state saved before generators were
            self.gen.manual_seed(cfg.seed * 7919 + self.state["step"])
        # CUDA draws its noise on the device: a resume there continues weights and Adam
        # exactly and the noise stream statistically (re-seeded from the step).
        self.dgen = torch.Generator(device=self.device).manual_seed(
            cfg.seed * 7919 + self.state["step"] + 1)
        self.mode, self.speed = self._pick_mode()
        if self.mode.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        compiled = cfg.compile if cfg.compile is not None else self._long_run()
        self.fwd = torch.compile(self.model) if compiled else self.model
        self.record = {"preset": self.preset_name, "train": asdict(self.cfg),
                       "data": {"shards": self.urls, "samples": self.n_data},
                       "device": str(self.device), "dtype": str(self.mode.dtype),
                       "step_mode": self.mode.label, "speed_probe": self.speed,
                       "compiled": compiled}

    def _load_model(self) -> tuple[UNet, str | None]:
        """Resume this folder's run, else warm-start from init_from, else a fresh network.
        A warm start keeps the preset of the checkpoint it starts from."""
        cfg = self.cfg
        if self.ckpt_path.exists():
            loaded = ckpt.load(self.ckpt_path, self.device)
            self.history = loaded.info.get("psnr_history", [])
            self.weights_info = loaded.info
            log.info("resuming from %s", self.ckpt_path)
            return loaded.model.train(), loaded.info.get("preset") or cfg.preset
        if cfg.init_from:
            loaded = ckpt.load(cfg.init_from, self.device)
            self.history = loaded.info.get("psnr_history", [])
            self.state.update(step=loaded.info.get("steps", 0),
                              images=loaded.info.get("images_seen", 0),
                              seconds=loaded.info.get("train_seconds", 0.0),
                              cpu_seconds=loaded.info.get("train_cpu_seconds", 0.0),
                              cpu_from_step=loaded.info.get("train_cpu_from_step"),
                              schedule_start=None,
                              # what this run's own compute is counted from, kept by resumes
                              # and branches (train.state): the checkpoint it started from
                              warm_start_from={"sha256": loaded.sha256, "steps": loaded.info.get(
                                  "steps", 0), "cpu_seconds": loaded.info.get(
                                  "train_cpu_seconds", 0.0)})
            log.warning("warm start from %s: weights only, Adam moments start from zero",
                        cfg.init_from)
            return loaded.model.train(), loaded.info.get("preset") or None
        return UNet(preset(cfg.preset)).to(self.device).train(), cfg.preset

    def _counters_follow_the_weights(self) -> None:
        """A save stopped between its files (model, moving average, state) leaves the weights
        ahead of the state's counters: count steps, images and time from the weights' record
        (Adam's moments stay those of the state's step) and say so, rather than train the same
        steps twice under a count that disagrees with the weights."""
        info, s = self.weights_info, self.state
        if info.get("steps") is not None and info["steps"] != s["step"]:
            log.warning("%s is at step %d but %s at step %d (a save was interrupted): counting "
                        "from the weights' step; Adam's moments are those of step %d",
                        self.ckpt_path.name, info["steps"], self.state_path.name, s["step"],
                        s["step"])
            s.update(step=info["steps"], images=info.get("images_seen", s["images"]),
                     seconds=info.get("train_seconds", s["seconds"]),
                     cpu_seconds=info.get("train_cpu_seconds", s["cpu_seconds"]))
        if self.ema_steps is not None and self.ema_steps != s["step"]:
            log.warning("ema.safetensors is the moving average up to step %d, the weights are "
                        "at step %d (a save was interrupted): the average continues from it",
                        self.ema_steps, s["step"])

    def _load_ema(self) -> AveragedModel:
        """The moving average, continued from this folder's ema.safetensors when there is one,
        else started at the current weights."""
        if not 0 < self.cfg.ema < 1:
            raise ValueError(f"--ema must be in (0, 1), got {self.cfg.ema}")
        ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.cfg.ema))
        path = self.out / "ema.safetensors"
        if path.exists() and self.ckpt_path.exists():
            loaded = ckpt.load(path, self.device)
            ema.module.load_state_dict(loaded.model.state_dict())
            self.ema_steps = loaded.info.get("steps")
            ema.n_averaged.fill_(1)   # 0 would make the next update a plain copy
        return ema

    def _long_run(self) -> bool:
        """Worth torch.compile (about a minute to compile, 1.35x after on an AVX2 host): CUDA,
        or a CPU run of 10+ minutes, by --minutes or by its steps left at the probed speed (an
        explicit --dtype skips the probe, so only --minutes tells then)."""
        cfg = self.cfg
        if self.device.type == "cuda":
            return True
        if cfg.minutes is not None:
            return cfg.minutes >= 10
        per_step = (self.speed or {}).get(self.mode.label)
        return bool(cfg.max_steps and per_step
                    and (cfg.max_steps - self.state["step"]) * per_step >= 600)

    def _pick_mode(self) -> tuple[StepMode, dict | None]:
        """CUDA: bf16 + channels_last. CPU: an explicit --dtype, else the fastest measured."""
        cfg = self.cfg
        if self.device.type == "cuda":
            return mode_from("fp32" if cfg.dtype == "fp32" else "bf16",
                             cfg.channels_last is not False), None
        if cfg.dtype != "auto":
            return mode_from(cfg.dtype, cfg.channels_last), None
        return probe(self.model, cfg.batch_size)

    # -- the loop's steps ----------------------------------------------------------------------
    def lr(self) -> float:
        return self.schedule(self.state["step"], self.state["images"] / self.n_data)

    def step(self, x: torch.Tensor) -> float:
        """One optimizer step on clean images (N, 3, 64, 64) in [0, 1], on the CPU or already
        on the device (augmented and noised here); returns the loss."""
        lr = self.lr()
        for group in self.opt.param_groups:
            group["lr"] = lr
        x = downscale(augment(x.to(self.device), self.gen), self.cfg.resolution)
        sig = sample_sigmas(len(x), self.gen, self.cfg.sigma_dist)
        if self.device.type == "cuda":   # draw the noise where it is used
            z = torch.randn(x.shape, generator=self.dgen, device=self.device)
        else:
            z = torch.randn(x.shape, generator=self.gen)
        x, z = self.mode.prepare(x, z.to(self.device))
        t0, c0 = time.monotonic(), cpu_clock()
        with self.mode.autocast(self.device):
            try:
                loss = loss_fn(self.fwd, x, sig.to(self.device), z)
            except Exception as e:   # a compile that fails here (no compiler...): go eager
                if self.fwd is self.model:
                    raise
                log.warning("torch.compile failed (%s); training without it",
                            str(e).splitlines()[0][:200])
                self.fwd, self.record["compiled"] = self.model, False
                loss = loss_fn(self.fwd, x, sig.to(self.device), z)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.state["seconds"] += time.monotonic() - t0
        self.state["cpu_seconds"] += cpu_clock() - c0
        self.state["step"] += 1
        self.state["images"] += len(x)
        return loss.item()

    def snapshot_if_due(self) -> None:
        """A learning-curve snapshot at the log-spaced steps (curve_steps)."""
        if self.state["step"] in self.cfg.curve_steps:
            ckpt.save(self.model, self.out / "curve" / f"step-{self.state['step']:07d}.safetensors",
                      dict(steps=self.state["step"], images_seen=self.state["images"]),
                      preset_name=self.preset_name)

    def eval_psnr(self, images) -> None:
        p = denoise_eval(self.model.eval(), images[:128], sigmas=(0.1,))
        self.model.train()
        self.history.append(dict(step=self.state["step"], psnr_0_1=p["0.1"]["denoised"]))
        if self.ema is not None:   # same images and noise: a paired comparison
            pe = denoise_eval(self.ema.module.eval(), images[:128], sigmas=(0.1,))
            self.history[-1]["psnr_0_1_ema"] = pe["0.1"]["denoised"]
        log.info("step %d: PSNR at sigma 0.1 = %.2f dB", self.state["step"],
                 p["0.1"]["denoised"])

    def save(self, test_images=None) -> None:
        """The checkpoint (with the full PSNR table when test images are given) and the state."""
        s = self.state
        info = dict(self.record, steps=s["step"], images_seen=s["images"],
                    epochs=round(s["images"] / self.n_data, 3), train_seconds=round(s["seconds"], 1),
                    train_cpu_seconds=round(s["cpu_seconds"], 1),
                    train_cpu_from_step=s["cpu_from_step"],
                    warm_start_from=s.get("warm_start_from"), psnr_history=self.history)
        if test_images is not None:
            info["psnr"] = denoise_eval(self.model.eval(), test_images)
            self.model.train()
        ema_info = None
        if self.ema is not None:
            ema_info = dict(info, ema_decay=self.cfg.ema, weights="moving average of "
                            "model.safetensors's weights over the steps since the EMA started")
            if test_images is not None:
                ema_info["psnr"] = denoise_eval(self.ema.module.eval(), test_images)
        # The evaluations above take minutes; the three writes below take milliseconds, so a
        # stop lands between them only rarely (and _counters_follow_the_weights handles it).
        ckpt.save(self.model, self.ckpt_path, info, preset_name=self.preset_name)
        if ema_info is not None:
            ckpt.save(self.ema.module, self.out / "ema.safetensors", ema_info,
                      preset_name=self.preset_name)
        save_state(self.state_path, self.opt, dict(s), self.gen)   # the counters, all JSON

    def batches(self) -> Iterator[torch.Tensor]:
        """Clean images forever, (B, 3, 64, 64) in [0, 1]; the order is re-seeded from the step.
        resident: the whole set decoded once onto the device (resident.py); else loader workers
        decode shuffled shards."""
        seed = self.cfg.seed + self.state["step"]
        if self.cfg.resident:
            from phisearch.indexer.train.resident import ResidentData

            return ResidentData(self.urls, self.device, seed).batches(self.cfg.batch_size)
        data = loader(self.urls, self.cfg.batch_size, workers=self.cfg.workers,
                      shuffle_buffer=2000, repeat=True, seed=seed)
        return (as_float(b.images()) for b in data if isinstance(b, Batch) and b.samples)


class _Every:
    """True once every `seconds` (monotonic clock)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.last = seconds, time.monotonic()

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            return True
        return False


def train(cfg: TrainConfig, progress: Callable[[dict], None] | None = None,
          on_step: Callable[[int, float], None] | None = None) -> Path:
    """Train (or resume) until cfg.max_steps or cfg.minutes. Returns the checkpoint path.
    `progress` gets running averages every 2 s; `on_step(step, loss)` every step; a line goes
    to train_log.jsonl every 30 s. Ctrl-C or SIGTERM finishes the step, saves and returns."""
    t = Trainer(cfg)
    test_images = load_images(expand(cfg.test_data), cfg.eval_images) if cfg.test_data else None
    stop = {"flag": False}
    old = {sig: signal.signal(sig, lambda *_: stop.update(flag=True))
           for sig in (signal.SIGINT, signal.SIGTERM)}
    t_run = time.monotonic()
    save_due, eval_due = _Every(cfg.save_every_minutes * 60), _Every(cfg.eval_every_minutes * 60)
    progress_due, log_due = _Every(2.0), _Every(30.0)
    window = {"images": 0, "loss": 0.0, "n": 0, "t": time.monotonic()}
    start_step = t.state["step"]
    t.state["runs"] += 1
    try:
        for batch in t.batches():
            if (cfg.max_steps is not None and t.state["step"] >= cfg.max_steps) or stop["flag"] \
                    or (cfg.minutes is not None and time.monotonic() - t_run > cfg.minutes * 60):
                break
            t.snapshot_if_due()
            loss = t.step(batch)
            window.update(images=window["images"] + len(batch), loss=window["loss"] + loss,
                          n=window["n"] + 1)
            if on_step:
                on_step(t.state["step"], loss)
            if progress and (t.state["step"] == start_step + 1 or progress_due()):
                progress(_window_line(t, window))
            if log_due():
                _log_line(t, window)
            if test_images is not None and eval_due():
                t.eval_psnr(test_images)
            if save_due():
                t.save()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    t.snapshot_if_due()
    t.save(test_images)
    return t.ckpt_path


def _window_line(t: Trainer, w: dict) -> dict:
    return dict(step=t.state["step"], loss=w["loss"] / max(w["n"], 1), lr=t.lr(),
                img_per_s=w["images"] / max(time.monotonic() - w["t"], 1e-9),
                epoch=t.state["images"] / t.n_data)


def _log_line(t: Trainer, w: dict) -> None:
    """One line of train_log.jsonl; the window (loss, img/s) starts again."""
    line = _window_line(t, w)
    with open(t.out / "train_log.jsonl", "a") as f:
        f.write(json.dumps(dict(step=line["step"], images=t.state["images"],
                                loss=round(line["loss"], 3), lr=line["lr"],
                                img_per_s=round(line["img_per_s"], 2),
                                time=time.time())) + "\n")
    w.update(images=0, loss=0.0, n=0, t=time.monotonic())

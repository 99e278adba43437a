"""Stage 4, the trainer: train on batch n (step 1 of the paper's pipeline). The trainer process.

It hosts the copier thread (pipeline/copier.py), turns each uint8 batch into the
network's input on the device (pipeline/transform.py), and runs the paper's recipe:
SGD steps (§5), validation at epoch ends, the learning rate divided by 10 when the
validation error stops improving, checkpoints every few minutes and at each epoch's
end. It reports to the supervisor through heartbeats and appends to history.jsonl.

Data position: batch content is a pure function of (seed, epoch, seq), so a checkpoint
records only (epoch, next seq) and a resumed run sees exactly the batches an
uninterrupted one would have. A checkpoint taken during validation points at the
start of that validation, which is re-run on resume.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import zmq
from torch.nn.parallel import DistributedDataParallel

from alexnetd.model.broadcast import broadcast_state
from alexnetd.model import (AlexNet, CheckpointError, PaperSGD, PlateauSchedule, TwoTowerAlexNet,
                            autocast_context, load_latest_checkpoint, load_rng_state, rng_state,
                            save_checkpoint, set_deterministic, set_lr)
from alexnetd.pipeline.dataset import DatasetError, open_dataset
from alexnetd.pipeline.launch import open_ring, trainer_input
from alexnetd.pipeline.stage import EXIT_BOOT, EXIT_HALT, Heartbeat, StageClock, StopFlag
from alexnetd.pipeline.transform import InputTransform
from alexnetd.service.config import Config
from alexnetd.service.group import GroupError, join_trainers
from alexnetd.service.history import History
from alexnetd.service.layout import RunLayout
from alexnetd.service.skiplog import SkipLog
from alexnetd.service.trainstep import KeepBeating, make_train_step

__all__ = ["run_trainer", "Trainer"]

log = logging.getLogger("alexnetd.trainer")

WAIT_MS = 500
AGREE_EVERY = 8  # batches between the ranks' votes on stopping (a collective and a sync)


def run_trainer(cfg: dict, local: int, resume: bool, group: dict | None = None) -> None:
    """Process entry point of this node's rank `local`. With a `group` (service/group.py:
    NodeGroup.trainer_args) it meets the other ranks of the data-parallel world there."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    config = Config(**cfg)
    stop = StopFlag()
    try:
        if group is not None:
            if config.device == "cuda":
                torch.cuda.set_device(local)
            join_trainers(group, config.device)
        trainer = Trainer(RunLayout.from_config(config), local, resume, stop)
    except (CheckpointError, DatasetError, GroupError, ValueError) as exc:
        _halt(config.run_dir, f"trainer could not start: {exc}")
        sys.exit(EXIT_BOOT)
    sys.exit(trainer.run())


def _halt(run_dir: str, reason: str) -> None:
    """Leave the reason where the supervisor looks for it, then exit non-zero."""
    log.error(reason)
    (Path(run_dir) / "halt.json").write_text(json.dumps({"reason": reason}))


class Trainer:
    def __init__(self, layout: RunLayout, local: int = 0, resume: bool = True, stop: StopFlag | None = None):
        config, place = layout.config, layout.ranks[local]
        self.config, self.layout, self.stop = config, layout, stop
        # rank and world_size are global (every node's ranks); local_rank is this node's index.
        self.rank, self.world_size, self.local_rank = place.rank, layout.world_size, local
        self.run_dir = Path(config.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.dataset = open_dataset(config.data)
        mean, eigvals, eigvecs = self.dataset.stats()
        # Each rank trains on every world_size-th batch of the same per-epoch permutation.
        self.plan = place.plan
        self.ring = open_ring(place.ring, layout.slots, config.batch_size, layout.decoding)
        endpoints = place.endpoints.as_dict()
        if config.deterministic:
            set_deterministic(config.seed)
        else:
            torch.manual_seed(config.seed)
        self.device = torch.device(f"cuda:{self.local_rank}" if config.device == "cuda" else "cpu")
        num_classes = len(self.dataset.classes)
        self.dtype = getattr(torch, config.dtype)
        self.autocast = config.bf16 and self.device.type == "cuda" and self.dtype == torch.float32
        if config.gpus == 2 and config.parallel == "model":
            self.model = TwoTowerAlexNet(num_classes, config.dropout, config.bias_init, devices=("cuda:0", "cuda:1"))
        else:
            self.model = AlexNet(num_classes, config.dropout, config.bias_init).to(self.device, self.dtype)
            if self.device.type == "cuda" and config.channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)
        self.net = self.model  # what the step calls: the model, or its DDP wrapper
        if self.world_size > 1:
            # DDP broadcasts rank 0's initial weights, and all-reduces gradients in the step.
            self.net = DistributedDataParallel(self.model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        self.optimizer = PaperSGD(self.model.parameters(), config.lr, config.momentum, config.weight_decay)
        # eager (the default), --compile or --cuda-graphs (service/trainstep.py); `status`
        # says compiling, and the beats go on, while a form compiles or is captured.
        self.train_step = make_train_step(
            self.net, self.optimizer, self.device, self.autocast, compile=config.compile,
            cuda_graphs=config.cuda_graphs,
            preparing=lambda: KeepBeating(lambda state: self._beat(state, force=True), lambda: self.phase,
                                          on_tick=self._leave_if_stopped_while_preparing))
        self.schedule = PlateauSchedule(config.lr, patience=config.lr_patience, max_epochs=config.max_epochs)
        self.transform = InputTransform(mean, eigvals, eigvecs, self.device, lighting=config.lighting)
        self.step = 0
        self.position = (0, 0)
        self.last_checkpoint: dict | None = None
        self.saved_key: tuple | None = None          # (step, epoch, next seq) of the checkpoint on disk
        self.checkpoint_failures = 0
        self.checkpoint_error: str | None = None     # why the last checkpoint write failed; None once one succeeds
        self.last_val: dict | None = None
        self.loss: float | None = None
        self._resume(resume)
        # The input side's trainer half (pipeline/launch.py): the decoder's part that runs
        # here, if any (DALI's thread), and the copier thread.
        self.decoder, self.copier = trainer_input(endpoints, self.ring, self.plan, layout.decoding, self.position,
                                                  self.device)
        self.clock = StageClock()
        self.beat = Heartbeat(zmq.Context.instance(), endpoints.get("beats"), "trainer", rank=self.rank)
        self.copier_beat = Heartbeat(zmq.Context.instance(), endpoints.get("beats"), "copier", rank=self.rank)
        # Each node's first rank keeps that node's history; global rank 0's is the run's.
        self.history = History(self.run_dir) if self.local_rank == 0 else _NoHistory()
        self.skiplog = SkipLog(self.run_dir, shared=layout.local_ranks > 1)  # this node's ranks share it
        self.splits: dict = {}
        self.rate = 0.0
        self.val = _ValTally()
        self.phase = "training"

    # -- checkpoints ---------------------------------------------------------------

    def _resume(self, resume: bool) -> None:
        found = None
        if self.rank == 0 and resume:
            found = load_latest_checkpoint(self.checkpoint_dir, self.dataset.fingerprint, self.config.data,
                                           map_location=self.device)
        if self.world_size > 1:
            # Only global rank 0 writes checkpoints (on node 0); every rank resumes from
            # the one it loaded, broadcast over torch.distributed (model/broadcast.py).
            found = broadcast_state(None if found is None else {"path": str(found[0]), "mtime": found[0].stat().st_mtime,
                                                                 "state": found[1]}, self.device)
            found = None if found is None else (found["path"], found["mtime"], found["state"])
        elif found is not None:
            found = (str(found[0]), found[0].stat().st_mtime, found[1])
        if found is None:
            return
        path, mtime, state = found
        self.model.load_state_dict(state["model"])
        optimizer_state = state["optimizer"]
        if isinstance(self.model, TwoTowerAlexNet):
            optimizer_state = self.model.optimizer_state_from_grouped(optimizer_state)
        self.optimizer.load_state_dict(optimizer_state)
        self.schedule.load_state_dict(state["schedule"])
        set_lr(self.optimizer, self.schedule.lr)
        load_rng_state(state["rng"])
        self.step, self.position = int(state["step"]), (int(state["epoch"]), int(state["next_seq"]))
        self.last_val = state.get("last_val")
        self.last_checkpoint = {"path": path, "step": self.step, "t": mtime, "write_seconds": 0.0}
        self.saved_key = (self.step, *self.position)
        log.info("resumed from %s at epoch %d seq %d, step %d", path, *self.position, self.step)

    def checkpoint(self, reason: str) -> bool:
        """Write a checkpoint; True if one of this state is on disk. A write that fails
        (a full disk, an I/O error) leaves the previous checkpoint as it was, is said in
        one line, shows in `status` and the metrics, and is retried at the next
        checkpoint time: training goes on."""
        if self.rank != 0:
            return True  # every rank holds the same weights; rank 0 writes them
        epoch, seq = self.position
        if seq > self.plan.train_batches:  # inside validation: resume re-runs all of it
            seq = self.plan.train_batches
        if self.saved_key == (self.step, epoch, seq):
            return True  # e.g. the last epoch's checkpoint is also the final one: once is enough
        optimizer_state = self.optimizer.state_dict()
        if isinstance(self.model, TwoTowerAlexNet):
            optimizer_state = self.model.optimizer_state_to_grouped(optimizer_state)
        state = {
            "model": self.model.state_dict(), "optimizer": optimizer_state,
            "schedule": self.schedule.state_dict(), "epoch": epoch, "next_seq": seq, "step": self.step,
            "rng": rng_state(), "config": self.config.to_dict(),
            "dataset_fingerprint": self.dataset.fingerprint, "classes": list(self.dataset.classes),
            "class_names": list(self.dataset.class_names), "num_classes": len(self.dataset.classes),
            "last_val": self.last_val,
        }
        # A big checkpoint on a slow disk outlasts the heartbeat timeout: say so first.
        self._beat("checkpointing", force=True)
        start = time.perf_counter()
        try:
            path = save_checkpoint(self.checkpoint_dir, state, keep=self.config.keep_checkpoints)
        except OSError as exc:
            self.checkpoint_failures += 1
            self.checkpoint_error = (f"checkpoint of step {self.step} not written to {self.checkpoint_dir}: "
                                     f"{exc.strerror or exc}")
            kept = self.last_checkpoint["path"] if self.last_checkpoint else "none"
            log.error("%s; the previous one (%s) stays, retrying at the next checkpoint time", self.checkpoint_error, kept)
            self.history.write("event", event="checkpoint-failed", reason=reason, step=self.step, error=self.checkpoint_error)
            self._beat(self.phase, force=True)
            return False
        seconds = time.perf_counter() - start
        self.saved_key = (self.step, epoch, seq)
        self.checkpoint_error = None
        self.last_checkpoint = {"path": str(path), "step": self.step, "t": time.time(), "write_seconds": seconds}
        self.history.write("event", event="checkpoint", reason=reason, step=self.step, path=str(path),
                           seconds=round(seconds, 3))
        log.info("checkpoint %s (%s, %.2f s)", path.name, reason, seconds)
        # Say at once that it is over: with checkpoints close together, the forced
        # "checkpointing" beat could otherwise be the only one the supervisor ever sees.
        self._beat(self.phase, force=True)
        return True

    # -- the loop ------------------------------------------------------------------

    def run(self) -> int:
        self.copier.start()
        if self.decoder:
            self.decoder.start()
        self.history.write("event", event="trainer-start", step=self.step, epoch=self.position[0])
        last_checkpoint_time = time.monotonic()
        # Resumed at --max-steps already: nothing to train (every rank has the same step).
        at_limit = bool(self.config.max_steps) and self.step >= self.config.max_steps
        reason = "max-steps" if at_limit else "stopped"
        try:
            batches = 0
            while not at_limit:
                stopping, over_budget = self.stop is not None and self.stop.stopping, self._skipped_over_budget()
                if self.world_size > 1:
                    if batches % AGREE_EVERY:
                        stopping = over_budget = False  # decided together at the next vote
                    else:
                        stopping, over_budget = self._agree(stopping, over_budget)
                batches += 1
                if over_budget:
                    _halt(self.config.run_dir, self._skip_message())
                    self.checkpoint("halt")
                    return EXIT_HALT
                if stopping:
                    break
                with self.clock.timing("starved"):
                    batch = self.copier.next_batch(WAIT_MS)
                if batch is None:
                    if self.decoder and self.decoder.error is not None:
                        raise RuntimeError(f"the decoder thread stopped: {self.decoder.error!r}")
                    self._beat(self.phase)
                    continue
                epoch, seq = batch.epoch, batch.seq
                with self.clock.timing("busy"):
                    if batch.split == "train":
                        self._train_step(batch)
                    else:
                        self._val_step(batch)
                self.copier.release(batch)
                self._name_skipped(batch)
                self.position = self.copier.position
                if seq == self.plan.batches_in_epoch(epoch) - 1:
                    if self._end_of_epoch(epoch):
                        reason = "finished"
                        break
                elif batch.split == "train" and time.monotonic() - last_checkpoint_time > 60 * self.config.checkpoint_every:
                    self.checkpoint("timer")
                    last_checkpoint_time = time.monotonic()
                if self.config.max_steps and self.step >= self.config.max_steps and batch.split == "train":
                    reason = "max-steps"
                    break
                self.phase = "validating" if batch.split == "val" else "training"
                self._beat(self.phase)
            final_error = None
            if not self.checkpoint(reason):
                kept = self.last_checkpoint or {}
                final_error = self.checkpoint_error
                log.error("final checkpoint not written (%s); a resume starts from %s (step %s)",
                          final_error, kept.get("path", "scratch"), kept.get("step", 0))
            self.history.write("event", event="trainer-stop", reason=reason, step=self.step,
                               checkpoint_error=final_error)
            self._beat("stopping", force=True)
            return 0
        finally:
            if self.decoder:
                self.decoder.close()
            self.copier.close()
            self.history.close()

    def _train_step(self, batch) -> None:
        if batch.n == 0:
            return  # every image of the batch failed to decode
        start = time.perf_counter()
        x = self.transform.train(batch.images, batch.crops, batch.flips, batch.alphas).to(self.dtype)
        labels = batch.labels.to(self.device, non_blocking=True)
        self.model.train()
        loss = self.train_step.run(x, labels)
        self.step += 1
        self.clock.images += batch.n
        if self.step % self.config.log_every == 0 or self.step == 1:
            # note: .item() is a device sync point; only every log_every steps
            self.loss = float(loss.item())
            seconds = time.perf_counter() - start
            self.rate = batch.n / seconds if seconds > 0 else 0.0
            lr = self.optimizer.param_groups[0]["lr"]
            self.history.write("step", step=self.step, epoch=batch.epoch, seq=batch.seq, loss=self.loss, lr=lr,
                               images_per_second=round(self.rate, 2))
            log.info("epoch %d step %d loss %.4f lr %g %.1f img/s", batch.epoch, self.step, self.loss, lr, self.rate)

    @torch.no_grad()
    def _val_step(self, batch) -> None:
        if batch.n == 0:
            return  # a rank's share of the last batch can be empty, or all images bad
        self.model.eval()
        crops = self.config.val_crops
        x = self.transform.eval(batch.images, crops=crops).to(self.dtype)
        with autocast_context(self.device, self.autocast):
            logits = self.model(x)
        # §4.1: average the softmax over the crops of each image
        probs = logits.float().softmax(1).reshape(batch.n, crops, -1).mean(1)
        self.val.add(probs, batch.labels.to(probs.device))

    def _end_of_epoch(self, epoch: int) -> bool:
        """Validation result, LR schedule, checkpoint. True when training is over."""
        if self.plan.validates(epoch):
            if self.world_size > 1:
                self.val.all_reduce(self.device)
            top1, top5 = self.val.errors()
            self.last_val = {"epoch": epoch, "step": self.step, "top1_error": top1, "top5_error": top5,
                             "crops": self.config.val_crops, "images": self.val.images}
            self.val = _ValTally()
            self.history.write("val", **self.last_val)
            lr = self.schedule.step(top1, epoch=epoch + 1)
            if lr != self.optimizer.param_groups[0]["lr"]:
                log.info("validation error stopped improving: learning rate %g -> %g", self.optimizer.param_groups[0]["lr"], lr)
                set_lr(self.optimizer, lr)
            log.info("epoch %d validation: top-1 error %.4f, top-5 error %.4f", epoch, top1, top5)
        self.checkpoint("epoch")
        return self.schedule.should_stop or epoch + 1 >= self.config.max_epochs

    # -- reporting -----------------------------------------------------------------

    def _agree(self, *flags: bool) -> tuple[bool, ...]:
        """With several ranks, a flag raised by any rank holds for all: they must leave the
        loop at the same step, or the others would wait forever in the next all-reduce."""
        if self.world_size == 1:
            return flags
        votes = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in votes.tolist())

    def _skipped_over_budget(self) -> bool:
        skipped = sum(self.copier.skipped.values())
        seen = self.copier.released_images + skipped  # both of trained batches only
        # A few bad files early on are not a verdict on the dataset: judge on a fair sample.
        return seen >= 10 * self.config.batch_size and skipped > self.config.skip_budget * seen

    def _name_skipped(self, batch) -> None:
        """Each skipped sample of a trained batch, named once per run in skipped.jsonl."""
        for index, reason in batch.skipped:
            if batch.split not in self.splits:
                self.splits[batch.split] = self.dataset.split(batch.split)
            split = self.splits[batch.split]
            path = split.path(index) if hasattr(split, "path") else None
            self.skiplog.record(batch.split, split.key(index), reason, batch.epoch, batch.seq, path)

    def _skip_message(self) -> str:
        skipped = self.copier.skipped
        return (f"{sum(skipped.values())} samples failed to decode ({skipped}), over the skip budget of "
                f"{self.config.skip_budget:.1%}: check the dataset")

    def _memory(self) -> dict:
        """Memory of the devices this rank uses, keyed so that the ranks' reports merge."""
        if self.device.type == "cuda":
            # Only this process's devices (one per rank; both towers' with parallel model):
            # asking about another device would create a CUDA context on it.
            devices = sorted({p.device for p in self.model.parameters()}, key=str)
            return {str(d): torch.cuda.memory_allocated(d) for d in devices}
        with open("/proc/self/statm") as fh:
            resident = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {"cpu" if self.world_size == 1 else f"cpu:{self.local_rank}": resident}

    def _leave_if_stopped_while_preparing(self) -> None:
        """Called each second, from KeepBeating's thread, while the step compiles (minutes
        on a CPU). A stop meanwhile need not wait for the compiler: the step being
        compiled is this process's first trained step (a later batch of another shape
        steps eagerly, trainstep.py), so nothing was trained since the checkpoint it
        resumed from and there is nothing to save. Leaves at once, as a finished stop
        does (history event, "stopping" beat, exit 0). One rank only: the ranks of a
        group stop together at their vote, never one alone."""
        if self.stop is None or not self.stop.stopping or self.world_size > 1:
            return
        if self.step != (self.saved_key[0] if self.saved_key else 0):
            return  # trained steps the checkpoint lacks: the stop waits for the step, as always
        log.info("stopped while the train step was being prepared; nothing trained since step %d, "
                 "no checkpoint to write", self.step)
        self.history.write("event", event="trainer-stop", reason="stopped while compiling", step=self.step,
                           checkpoint_error=None)
        self.history.close()
        self._beat("stopping", force=True)
        logging.shutdown()
        os._exit(0)  # the compiler holds the main thread; the supervisor clears what is left

    def _beat(self, state: str, force: bool = False) -> None:
        if not (force or self.beat.due()):
            return
        stats = self.copier.stats()
        self.copier_beat.maybe(self.copier.clock, force=force)
        self.beat.maybe(
            self.clock, force=force, state=state, step=self.step, epoch=self.position[0], seq=self.position[1],
            steps_per_epoch=self.plan.train_batches, batches_in_epoch=self.plan.batches_in_epoch(self.position[0]),
            loss=self.loss, lr=self.optimizer.param_groups[0]["lr"], images_per_second=self.rate,
            val=self.last_val, checkpoint=self.last_checkpoint, reorder=stats["reorder"],
            slots_in_use=stats["in_use"], skipped=stats["skipped"], malformed=stats["malformed"],
            memory=self._memory(), max_epochs=self.config.max_epochs, max_steps=self.config.max_steps,
            checkpoint_failures=self.checkpoint_failures, checkpoint_error=self.checkpoint_error,
            skipped_recent=list(self.skiplog.recent),
        )


class _ValTally:
    """Top-1 / top-5 errors over one validation pass."""

    def __init__(self):
        self.images = self.top1 = self.top5 = 0

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        k = min(5, probs.shape[1])
        top = probs.topk(k, dim=1).indices
        self.top1 += int((top[:, 0] == labels).sum())
        self.top5 += int((top == labels[:, None]).any(1).sum())
        self.images += len(labels)

    def all_reduce(self, device) -> None:
        """Sum the tallies of every rank: each validated its own share of the images."""
        counts = torch.tensor([self.images, self.top1, self.top5], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        self.images, self.top1, self.top5 = (int(v) for v in counts.tolist())

    def errors(self) -> tuple[float, float]:
        if not self.images:
            return 1.0, 1.0
        return 1 - self.top1 / self.images, 1 - self.top5 / self.images


class _NoHistory:
    """Ranks other than 0 keep no history: rank 0's is the run's."""

    def write(self, kind: str, **fields) -> None:
        pass

    def close(self) -> None:
        pass

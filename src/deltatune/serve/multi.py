"""One loaded base model, many attached task deltas, and predictions for any mix of their tasks.

`load_many([run_dir, ...])` loads the base once, checks every delta was trained on it (by the weight
fingerprint each delta records), and attaches each delta under a name (its task's name, made unique).
`MultiTaskModel.predict(inputs, task=...)` answers for one task, or for one task per input:

- rows whose delta's method declares `batch_mixing = "per-row"` (LoRA, (IA)3, BitFit, LayerNorm
  tuning, adapters, prompt and prefix tuning) share forward passes: rows are sorted by length across tasks and cut into
  batches where that saves compute (`batching.padding_aware_batches`: a few long rows do not pad every
  short one, and batches are not made so small that each pass's fixed cost dominates); each batch's rows are sorted by delta so each site runs every delta's part on its slice of
  the batch (`deltatune.methods.state.mixed_rows`, `RowRouting.contiguous`). Where those batches would
  still hold many padding positions (a server's requests in arrival order) and every delta is
  position-wise, the rows run packed through a BERT or RoBERTa encoder instead, in as few batches as the
  batch size allows (`deltatune.serve.packed`);
- rows of other deltas (full fine-tuning, freeze, sparse masks, ...) run in forward passes of their
  own, one delta at a time, with that delta active;
- each row's own head gives its task's outputs, mapped to labels or to score units by its own
  regression scale;
- a bi-encoder delta (each text of a pair pooled alone: MiniLM-L6's default for STS-B) joins the same
  forward passes with each text as a row of its own; afterwards its two pooled rows give the cosine (a score
  task) or go through its own classifier over [u, v, |u-v|] (a classification task); it is served beside
  cross-encoders that pool the same way (`deltatune.heads.serving_head`).

The model is used by one thread at a time (`lock`). A long-running caller (the HTTP server) keeps the
mixed-batch state open across calls with `serving()`; attaching or detaching a delta closes and
reopens it, so neither needs a restart.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deltatune.batching import SECOND_TEXT, Encoded, collate, encode, padding_aware_batches, to_task_units
from deltatune.delta import load_checked_base, read_manifest, read_tensors
from deltatune.devices import model_device
from deltatune.errors import DeltatuneError
from deltatune.methods import activate_delta, attach_delta, build_method, detach_delta
from deltatune.methods.state import PER_ROW, RowMixer, attached_deltas, mixed_rows, parameter_index
from deltatune.padding import padding_id
from deltatune.precision import PRECISIONS, frozen_linear_weights_in_bf16, resolve_precision
from deltatune.records import DeltaManifest, ManifestHead
from deltatune.serve.packed import packable_deltas, packed_encoder
from deltatune.tasks.spec import Split, TaskSpec

Example = str | Sequence[str]

PACK_ABOVE_PADDING = 1.15
"""Without batch invariance, a mixed call's batches run packed when their padded rows would hold more than this
many positions per real token (and every routed delta allows it): see `MultiTaskModel._batches`."""


@dataclass(frozen=True)
class ServedTask:
    """One attached delta and the task it answers."""

    name: str
    """The delta's name on the model: what `predict(task=...)` and the HTTP API call it."""
    task: TaskSpec
    method: str
    batch_mixing: str
    """'per-row' (shares forward passes with other deltas) or 'grouped' (forward passes of its own)."""
    manifest: DeltaManifest
    directory: Path
    delta_bytes: int
    """Size of its delta.safetensors."""
    resident_bytes: int
    """Memory it holds beside the base model (a full fine-tuning delta holds a whole model's weights)."""
    texts_apart: bool = False
    """A bi-encoder: each text of an input is its own row of the forward pass; their pooled rows give the cosine
    (a score task) or go through `pair_head` (a classifier)."""
    pair_head: tuple[torch.Tensor, torch.Tensor] | None = None
    """A bi-encoder classifier's own linear layer (weight, bias) over [u, v, |u-v|] of the two pooled texts."""

    def describe(self, base_fingerprint: str) -> dict:
        task = self.task
        return {
            "name": self.name,
            "task": task.name,
            "text_fields": list(task.text_fields),
            "labels": list(task.labels),
            "regression": task.is_regression,
            "metric": task.metric,
            "dev_metrics": self.manifest.metrics.get("dev", {}),
            "method": self.method,
            "head": self.manifest.resolved_head.kind,
            "batch_mixing": self.batch_mixing,
            "delta_bytes": self.delta_bytes,
            "resident_bytes": self.resident_bytes,
            "base_model": self.manifest.base_model.name,
            "base_fingerprint": base_fingerprint,
        }


class MultiTaskModel:
    """A frozen base model with many task deltas attached; predicts for any mix of their tasks."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        base_name: str,
        fingerprint: str,
        head: dict | None = None,
        batch_invariant: bool = True,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.fingerprint = fingerprint
        self.head = head
        """The head the base was loaded with ({'kind', 'pooling'}: `deltatune.heads.serving_head`); deltas
        attached later must fit it. None: not checked (the caller built the base)."""
        self.batch_invariant = batch_invariant
        """Whether an input's answer is kept from depending on the inputs it shares a batch with: mixed batches
        of packable deltas always run packed, each row attending among rows of its own length alone (see
        "Batch invariance" in `deltatune.serve.packed`)."""
        self.tasks: dict[str, ServedTask] = {}
        self.lock = threading.RLock()
        self._session: ExitStack | None = None
        self._session_closer: weakref.finalize | None = None
        self._session_precision: str | None = None
        self._mixer: RowMixer | None = None
        self._keep_open = 0

    def to(self, device: torch.device) -> MultiTaskModel:
        """Move the base and every attached delta to `device`; deltas attached later follow them there."""
        with self.lock:
            self._close_session()
            self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    # ------------------------------------------------------------------------------ deltas

    def attach(self, run_dir: str | Path, name: str | None = None) -> ServedTask:
        """Attach the delta of `run_dir` under `name` (default: its task's name, made unique)."""
        directory = Path(run_dir)
        manifest = read_manifest(directory)
        expected = manifest.base_model.fingerprint
        if expected != self.fingerprint:
            raise DeltatuneError(
                f"{directory} was trained on base model {manifest.base_model.name!r} (weights fingerprint "
                f"{expected[:12]}), but the loaded base {self.base_name!r} has fingerprint {self.fingerprint[:12]}. "
                "Serve deltas of one base model together; start another process for the other base."
            )
        tensors = read_tensors(directory)
        task = manifest.task
        with self.lock:
            self._check_head(directory, manifest)
            name = name if name is not None else self._unique_name(task.name)
            if name in self.tasks:
                raise DeltatuneError(
                    f"A delta named {name!r} is already attached ({self.tasks[name].directory}); "
                    "choose another name, or detach it first."
                )
            self._close_session()
            method = build_method(manifest.method, manifest.method_config)
            pair_head = None
            if manifest.resolved_head.kind == "bi-encoder":
                tensors, pair_head = self._bi_encoder_tensors(tensors)
                if pair_head is None and not task.is_regression:
                    raise DeltatuneError(
                        f"{directory} was trained with a bi-encoder classifier, but its delta.safetensors holds no "
                        "classifier (classifier.weight, classifier.bias) to read [u, v, |u-v|] with. The file is "
                        "not the one training wrote: train the run again."
                    )
            device = self.device
            attach_delta(self.model, method, tensors, name, tokenizer=self.tokenizer)
            self.model.to(device)  # a delta's tensors load on the CPU: join the base where it computes
            activate_delta(self.model, None)  # between calls the model is the base alone, whatever was attached
            self.model.eval()
            served = ServedTask(
                name,
                task,
                method.name,
                method.batch_mixing,
                manifest,
                directory,
                (directory / "delta.safetensors").stat().st_size,
                self._resident_bytes(name, pair_head),
                manifest.resolved_head.kind == "bi-encoder",
                pair_head,
            )
            self.tasks[name] = served
            return served

    def _check_head(self, directory: Path, manifest: DeltaManifest) -> None:
        """Refuse a delta whose head needs another forward pass of the base than the one loaded."""
        from deltatune.heads import serving_head

        if self.head is None:
            return
        served = list(self.tasks.values())
        wanted = serving_head([*(t.directory for t in served), directory], [*(t.manifest for t in served), manifest])
        # a base loaded with a cross-encoder head also serves bi-encoders that pool the same way
        fits = wanted == self.head or (
            self.head["kind"] == "cross-encoder" and wanted == {**self.head, "kind": "bi-encoder"}
        )
        if not fits:
            raise DeltatuneError(
                f"{directory} needs the base loaded with a {wanted['kind']} head pooling by {wanted['pooling']}, "
                f"but this process loaded it with a {self.head['kind']} head pooling by {self.head['pooling']}. "
                "Serve it from another process, or start this one with every delta at once (load_many)."
            )

    def _bi_encoder_tensors(
        self, tensors: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """A bi-encoder delta's tensors to attach, and its classifier's (weight, bias) kept apart (None for a
        score task's cosine, which has no weights).

        Its rows never reach the base's head (their pooled texts are read before it), but every attached delta
        holds a value of each tensor the deltas of the model rewrite: it carries the base's head tensors, and
        its own classifier, which reads [u, v, |u-v|] (three times the base head's width), stays beside them."""
        from deltatune.heads import PAIR_HEAD
        from deltatune.methods.common import head_names

        pair_head = None
        if all(name in tensors for name in PAIR_HEAD):
            tensors = dict(tensors)
            weight, bias = (tensors.pop(name).float() for name in PAIR_HEAD)  # on the CPU, as the pooled rows
            pair_head = (weight, bias)
        head = head_names(self.model)
        unused = {
            name: parameter.detach().cpu().clone() for name, parameter in self.model.named_parameters() if name in head
        }
        return {**unused, **tensors}, pair_head

    def detach(self, name: str) -> None:
        """Remove delta `name`; the others and the base are left as they were."""
        with self.lock:
            if name not in self.tasks:
                raise DeltatuneError(f"No task named {name!r} is served; served: {', '.join(self.tasks) or 'none'}.")
            self._close_session()
            detach_delta(self.model, name)
            del self.tasks[name]

    def _unique_name(self, task_name: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9_-]+", "-", task_name).strip("-")[:60] or "task"
        name, number = stem, 2
        while name in self.tasks or name in attached_deltas(self.model).methods:
            name, number = f"{stem}-{number}", number + 1
        return name

    def _resident_bytes(self, name: str, pair_head: tuple[torch.Tensor, ...] | None = None) -> int:
        """Bytes delta `name` holds beside the base: its own parts, its values of base tensors it rewrites, and a
        bi-encoder classifier's own layer (`pair_head`)."""
        record = attached_deltas(self.model)
        index = parameter_index(self.model)
        tensors: list[torch.Tensor] = [parameter for _, parameter in index.of(name).values()]
        if record.active == name:
            tensors += [index.base[canonical][1] for canonical in record.rewritten(self.model, name, index)]
        else:
            tensors += list(record.stored.get(name, {}).values())
        tensors += list(pair_head or ())
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    def memory(self) -> dict:
        """Bytes of the base model's tensors and of what each delta holds beside them."""
        index = parameter_index(self.model)
        base = sum(parameter.numel() * parameter.element_size() for _, parameter in index.base.values())
        base += sum(buffer.numel() * buffer.element_size() for buffer in self.model.buffers())
        with self.lock:
            deltas = {name: self._resident_bytes(name, task.pair_head) for name, task in self.tasks.items()}
        return {"base_bytes": base, "delta_bytes": deltas, "total_bytes": base + sum(deltas.values())}

    # -------------------------------------------------------------------------- prediction

    def predict(
        self,
        inputs: Example | Sequence[Example],
        task: str | Sequence[str],
        *,
        batch_size: int = 64,
        precision: str = "auto",
    ) -> list[dict]:
        """Predict for `inputs`: a list of examples (an example is a text, or a list of texts for a pair task).

        `task` names one served task for all inputs, or gives one task per input. Each result is
        {'task', 'label', 'probabilities'} for classification or {'task', 'score'} for regression.
        """
        rows, names = self._check_inputs(inputs, task, batch_size, precision)
        with self.lock:
            outputs = self._raw_outputs(rows, names, batch_size, precision)
            if not self._keep_open:
                self._close_session()
        return [self._result(self.tasks[name], output) for name, output in zip(names, outputs, strict=True)]

    def evaluate(
        self, task: str, split: str = "dev", *, batch_size: int = 64, precision: str = "auto", limit: int | None = None
    ) -> dict[str, float]:
        """Metrics of task `task`'s delta on a split of its data (rebuilt from the source its run recorded)."""
        from deltatune.batching import outputs_to_predictions
        from deltatune.metrics import compute_metrics
        from deltatune.sources.records import load_data_from_record

        served = self._served(task, "task")
        data = load_data_from_record(served.manifest.training_data(served.directory)).split(split)
        if limit is not None:
            data = data.subset(range(min(limit, len(data))))
        with self.lock:
            outputs = self._raw_outputs(list(data.texts), [task] * len(data), batch_size, precision)
            if not self._keep_open:
                self._close_session()
        scaled = to_task_units(np.stack(outputs), served.manifest.target_scale)
        return compute_metrics(served.task.metrics, outputs_to_predictions(scaled, served.task), data.labels)

    @contextmanager
    def serving(self) -> Iterator[MultiTaskModel]:
        """Keep the mixed-batch state (and bf16 weight copies) open across `predict` calls within the block."""
        with self.lock:
            self._keep_open += 1
        try:
            yield self
        finally:
            with self.lock:
                self._keep_open -= 1
                if not self._keep_open:
                    self._close_session()

    def _served(self, name, field: str) -> ServedTask:
        if not isinstance(name, str) or name not in self.tasks:
            raise DeltatuneError(
                f"{field}: no task named {name!r} is served; served: {', '.join(map(repr, self.tasks)) or 'none'}."
            )
        return self.tasks[name]

    def _check_inputs(self, inputs, task, batch_size, precision) -> tuple[list[tuple[str, ...]], list[str]]:
        """Every example and task checked at once: one DeltatuneError naming each bad field."""
        if isinstance(inputs, str):
            inputs = [inputs]  # one text: one example
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise DeltatuneError(
                f"inputs must be a non-empty list of examples (a text, or a list of texts for a "
                f"pair task), got {type(inputs).__name__} {str(inputs)[:40]!r}."
            )
        names = [task] * len(inputs) if isinstance(task, str) else task
        if not isinstance(names, (list, tuple)) or len(names) != len(inputs):
            raise DeltatuneError(
                f"task must be one task name or a list of one per input ({len(inputs)}), got {str(task)[:60]!r}."
            )
        if precision not in PRECISIONS:
            raise DeltatuneError(f"precision={precision!r} must be one of {', '.join(PRECISIONS)}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DeltatuneError(f"batch_size={batch_size!r} must be a positive integer.")
        problems, rows = [], []
        for position, (example, name) in enumerate(zip(inputs, names, strict=True)):
            try:
                served = self._served(name, f"task[{position}]" if not isinstance(task, str) else "task")
                rows.append(check_example(example, served.task, f"inputs[{position}]"))
            except DeltatuneError as error:
                problems.append(str(error))
        if problems:
            shown = problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])
            raise DeltatuneError(" ".join(dict.fromkeys(shown)))
        return rows, list(names)

    def _raw_outputs(
        self, rows: list[tuple[str, ...]], names: list[str], batch_size: int, precision: str
    ) -> list[np.ndarray]:
        """Each input's raw head outputs (its task's width), per-row deltas in shared forward passes.

        The forward passes run over encoder rows: one per input, or one per text of a bi-encoder's input."""
        precision = resolve_precision(precision, self.device.type)
        encoded, owners = self._encode(rows, names)
        inputs_names, names = names, [names[owner] for owner in owners]
        outputs: list[np.ndarray | None] = [None] * len(owners)
        mixed = [row for row, name in enumerate(names) if self.tasks[name].batch_mixing == PER_ROW]
        if mixed:
            mixer = self._open_session(precision)
            packable = packable_deltas(self.model, [names[row] for row in mixed])
            batches, packed = self._batches(encoded, mixed, batch_size, packable, always=self.batch_invariant)
            for batch in batches:
                # each delta's rows together: sites then work on slices of the batch, not per-row gathers
                batch = [batch[position] for position in mixer.grouped_order([names[row] for row in batch])]
                mixer.route([names[row] for row in batch])
                self._forward(encoded, batch, names, outputs, packed=mixer if packed else None)
        for name in dict.fromkeys(name for name in names if self.tasks[name].batch_mixing != PER_ROW):
            self._close_session()
            activate_delta(self.model, name)
            rows_of_delta = [row for row, row_name in enumerate(names) if row_name == name]
            with ExitStack() as stack:
                if precision == "bf16" and self.device.type == "cpu":
                    stack.enter_context(frozen_linear_weights_in_bf16(self.model, include_trainable=True))
                for batch in self._batches(encoded, rows_of_delta, batch_size)[0]:
                    self._forward(encoded, batch, names, outputs, precision)
            activate_delta(self.model, None)
        predicted = [output for output in outputs if output is not None]
        assert len(predicted) == len(outputs)  # every row ran in a mixed batch or with its own delta
        return self._per_input(predicted, owners, inputs_names)

    def _per_input(self, outputs: list[np.ndarray], owners: list[int], names: list[str]) -> list[np.ndarray]:
        """Encoder rows' outputs back to one per input: a bi-encoder's two pooled texts give their cosine, or its
        classifier's outputs."""
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for owner, output in zip(owners, outputs, strict=True):
            parts[owner].append(output)
        apart: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            if self.tasks[name].texts_apart:
                apart.setdefault(name, []).append(row)
        for name, rows in apart.items():  # as the bi-encoder head computes it (`PooledTaskModel.forward`), in fp32
            first = torch.from_numpy(np.stack([parts[row][0] for row in rows]))
            second = torch.from_numpy(np.stack([parts[row][1] for row in rows]))
            pair_head = self.tasks[name].pair_head
            if pair_head is None:
                answers = nn.functional.cosine_similarity(first, second, dim=-1).unsqueeze(-1)
            else:
                features = torch.cat([first, second, (first - second).abs()], dim=-1)
                answers = nn.functional.linear(features, *pair_head)
            for row, output in zip(rows, answers.numpy(), strict=True):
                parts[row] = [output]  # float32: pooled rows and the layer are
        return [part[0] for part in parts]

    def _forward(
        self,
        encoded: Encoded,
        batch: list[int],
        names: list[str],
        outputs: list,
        precision: str | None = None,
        packed: RowMixer | None = None,
    ) -> None:
        """One forward pass over `batch`; `packed`: the mixer that routed it, to run its encoder without padding.

        A row of a bi-encoder keeps its pooled hidden state (the cosine of its pair comes in `_per_input`); every
        other row its head's outputs."""
        from deltatune.batching import to_device
        from deltatune.heads import pool
        from deltatune.precision import autocast_for

        device = self.device
        features = to_device(collate(encoded, batch, padding_id(self.tokenizer), regression=False), device)
        features.pop("labels")
        precision = precision or self._session_precision
        assert precision is not None  # outside a mixed-batch session the caller names the precision
        apart = [self.tasks[names[row]] for row in batch if self.tasks[names[row]].texts_apart]
        hidden: list[torch.Tensor] = []
        logits = None
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(autocast_for(precision, device.type))
            if packed is not None:
                stack.enter_context(
                    packed_encoder(self.model, packed, features["attention_mask"], exact=self.batch_invariant)
                )
            backbone = self.model.base_model
            assert isinstance(backbone, nn.Module)  # a task model's pretrained backbone
            if len(apart) == len(batch):  # no head to run: the backbone alone
                hidden.append(backbone(**features).last_hidden_state)
            else:
                if apart:
                    handle = backbone.register_forward_hook(lambda _m, _a, output: hidden.append(output[0]))
                    stack.callback(handle.remove)
                logits = self.model(**features).logits.float().cpu()
            pooled = (
                pool(hidden[0], features["attention_mask"], apart[0].manifest.resolved_head.pooling) if apart else None
            )
        for position, row in enumerate(batch):
            served = self.tasks[names[row]]
            if served.texts_apart:
                assert pooled is not None
                outputs[row] = pooled[position].float().cpu().numpy()
            else:
                assert logits is not None
                outputs[row] = logits[position, : served.task.num_labels].numpy()

    @staticmethod
    def _batches(
        encoded: Encoded, rows: list[int], batch_size: int, packable: bool = False, always: bool = False
    ) -> tuple[list[list[int]], bool]:
        """Rows sorted by length and cut into batches where padding costs (`padding_aware_batches`), and whether
        to run them packed instead (`deltatune.serve.packed`, when `packable`): then the rows are cut into as few
        batches as `batch_size` allows, since no linear layer computes padding. `always`: packed whenever
        `packable` (batch invariance).

        Packing pays where the padded batches would hold many padding positions (a server's batch of requests
        in arrival order); over rows sorted across a large call the padded batches hold few, and packing's
        regathering for attention costs more than it saves.
        """
        every_length = encoded.lengths  # a property that measures every row: read it once, not once per row
        lengths = [every_length[row] for row in rows]
        padded = padding_aware_batches(lengths, batch_size)
        if packable:
            padded_tokens = sum(len(batch) * max(lengths[position] for position in batch) for batch in padded)
            if always or padded_tokens > PACK_ABOVE_PADDING * sum(lengths):
                order = sorted(range(len(rows)), key=lengths.__getitem__)
                chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
                return [[rows[position] for position in chunk] for chunk in chunks], True
        return [[rows[position] for position in batch] for batch in padded], False

    def _encode(self, rows: list[tuple[str, ...]], names: list[str]) -> tuple[Encoded, list[int]]:
        """Tokenise each task's inputs as that task was trained (its fields and max length), in input order, and
        say which input each encoder row belongs to (a bi-encoder's input gives two rows: its texts apart)."""
        counts = [2 if self.tasks[name].texts_apart else 1 for name in names]
        starts = [0, *accumulate(counts[:-1])]
        owners = [row for row, count in enumerate(counts) for _ in range(count)]
        features: dict[str, list] = {}
        for name in dict.fromkeys(names):
            served = self.tasks[name]
            positions = [row for row, row_name in enumerate(names) if row_name == name]
            split = Split([rows[row] for row in positions], [0] * len(positions))
            part = encode(self.tokenizer, served.task, split, served.manifest.max_length, served.texts_apart)
            for key, values in part.features.items():
                column = features.setdefault("input_ids" if key == SECOND_TEXT else key, [None] * len(owners))
                offset = 1 if key == SECOND_TEXT else 0
                for row, value in zip(positions, values, strict=True):
                    column[starts[row] + offset] = value
        if "token_type_ids" in features:  # rows encoded without them (a bi-encoder's texts, each alone) get zeros
            features["token_type_ids"] = [
                value if value is not None else [0] * len(ids)
                for value, ids in zip(features["token_type_ids"], features["input_ids"], strict=True)
            ]
        return Encoded(features, [0] * len(owners)), owners

    def _open_session(self, precision: str):
        """The mixed-batch state: base active, per-row routing installed, bf16 weight copies if asked."""
        if self._session is not None and self._session_precision == precision:
            return self._mixer
        self._close_session()
        stack = ExitStack()
        try:
            self._mixer = stack.enter_context(mixed_rows(self.model))
            if precision == "bf16" and self.device.type == "cpu":
                stack.enter_context(frozen_linear_weights_in_bf16(self.model, include_trainable=True))
        except BaseException:
            stack.close()
            raise
        self._session, self._session_precision = stack, precision
        # a session still open when the interpreter exits (a `serving()` block never left) is closed before
        # the modules that undo it are torn down, not by the garbage collector after them
        self._session_closer = weakref.finalize(self, stack.close)
        return self._mixer

    def _close_session(self) -> None:
        if self._session is not None:
            session, self._session, self._mixer, self._session_precision = self._session, None, None, None
            if self._session_closer is not None:
                self._session_closer.detach()
            session.close()

    @staticmethod
    def _result(served: ServedTask, output: np.ndarray) -> dict:
        task = served.task
        scaled = to_task_units(output[None, :], served.manifest.target_scale)[0]
        if task.is_regression:
            return {"task": served.name, "score": float(scaled[0])}
        probabilities = torch.softmax(torch.from_numpy(scaled), dim=-1).tolist()
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        return {
            "task": served.name,
            "label": task.labels[best],
            "probabilities": dict(zip(task.labels, probabilities, strict=True)),
        }


def check_example(example, task: TaskSpec, field: str) -> tuple[str, ...]:
    """An example as a tuple of texts, one per field of `task`; a DeltatuneError naming `field` otherwise."""
    texts = (example,) if isinstance(example, str) else example
    fields = task.text_fields
    if not isinstance(texts, (list, tuple)):
        raise DeltatuneError(
            f"{field} must be a text or a list of {len(fields)} texts ({', '.join(fields)}), got "
            f"{type(example).__name__}."
        )
    if len(texts) != len(fields):
        raise DeltatuneError(
            f"{field} has {len(texts)} text(s) but task {task.name!r} takes {len(fields)} ({', '.join(fields)})."
        )
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise DeltatuneError(f"{field}[{position}] must be a string, got {type(text).__name__}.")
    return tuple(texts)


def load_many(
    run_dirs: Sequence[str | Path],
    names: Sequence[str] | None = None,
    base: str | None = None,
    batch_invariant: bool = True,
) -> MultiTaskModel:
    """Load the base model once and attach every delta of `run_dirs`, each under its own name.

    `names` gives the names (default: each run's task name, made unique: 'stsb', 'stsb-2');
    `base` overrides where the base model is loaded from. All deltas must have been trained on the
    same base model (checked by its weight fingerprint) before anything is loaded. `batch_invariant`:
    see `MultiTaskModel.batch_invariant`.
    """
    if isinstance(run_dirs, (str, Path)):
        raise DeltatuneError(
            f"load_many takes a list of run directories, got the single path {str(run_dirs)!r}; "
            "pass [path], or use deltatune.load for one delta."
        )
    run_dirs = [Path(directory) for directory in run_dirs]
    if not run_dirs:
        raise DeltatuneError("load_many needs at least one run directory.")
    if names is not None:
        names = list(names)
        if len(names) != len(run_dirs) or len(set(names)) != len(names):
            raise DeltatuneError(f"names={names!r} must give one distinct name per run directory ({len(run_dirs)}).")
    manifests = [read_manifest(directory) for directory in run_dirs]
    from deltatune.heads import serving_head

    head = serving_head(run_dirs, manifests)
    by_fingerprint: dict[str, list[str]] = {}
    for directory, manifest in zip(run_dirs, manifests, strict=True):
        by_fingerprint.setdefault(manifest.base_model.fingerprint, []).append(
            f"{directory} ({manifest.base_model.name!r})"
        )
    if len(by_fingerprint) > 1:
        groups = "; ".join(f"{fingerprint[:12]}: {', '.join(dirs)}" for fingerprint, dirs in by_fingerprint.items())
        raise DeltatuneError(
            f"These deltas were trained on {len(by_fingerprint)} different base models ({groups}); "
            "one process serves the deltas of one base. Start one per base."
        )
    base_name = base or manifests[0].base_model.name
    model, tokenizer = load_checked_base(
        manifests[0],
        base,
        head=ManifestHead(head["kind"], head["pooling"]),
        fix="Load these deltas onto {name!r} (pass base= to point at a copy of it).",
    )
    served = MultiTaskModel(
        model, tokenizer, base_name, manifests[0].base_model.fingerprint, head, batch_invariant=batch_invariant
    )
    for position, directory in enumerate(run_dirs):
        served.attach(directory, names[position] if names is not None else None)
    return served


__all__ = ["MultiTaskModel", "ServedTask", "check_example", "load_many"]

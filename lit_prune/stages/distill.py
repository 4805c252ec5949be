"""Distill: E3-Pruner's entropy-aware adaptive KD from the dense teacher into the pruned student.

One training step on a batch ``x``::

    teacher = dense(x) under no_grad        (online, `teacher`)        or  cache.lookup(x)  (`teacher_cache`, top-K)
    student = pruned(x)                     trainable: all weights | LoRA (all kept layers or endpoints) | endpoints
    loss = kd_share * entropy_aware_kd(student, teacher) + (1 - kd_share) * CE(student, x)

The KD term weights every token's KL by the teacher's entropy there (``lit_prune.components.kd``), or with
``weighting: student_selective`` distils only the tokens where the student is most uncertain (SE-KD). With
``teacher_cache`` no teacher is loaded at all: build the cache once with ``python -m lit_prune cache-teacher`` on the
same data settings. Memory with an online teacher: the dense teacher (frozen, same dtype) plus the student.
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor

from lit_prune.assets import canonical_model_id
from lit_prune.components.checks import check_choice
from lit_prune.components.kd import (
    SparseTeacher,
    Teacher,
    Weighting,
    check_select_fraction,
    entropy_aware_kd_terms,
    sample_teacher,
    topk_teacher,
    topk_with_tail,
)
from lit_prune.components.layers import decoder_layers
from lit_prune.components.losses import Direction, kd_ce_mix, next_token_ce
from lit_prune.components.teacher_cache import TeacherCacheError, TopKCache
from lit_prune.deprecation import renamed_key
from lit_prune.stages.recovery import RecoveryStage, check_share

TrainScope = Literal["all", "lora", "endpoints"]
CacheVariant = Literal["tail", "renormalized", "sampled"]
LoraLayers = Literal["all", "endpoints"]


class Distill(RecoveryStage):
    """Distill a dense teacher into the layer-pruned student (optionally weighting each token's KL by its entropy).

    The student, teacher, endpoint and LoRA settings (``teacher``, ``kd_temperature``, ``width``,
    ``endpoint_layers_override``, ``target_modules``, ``r``, ``alpha``, ``dropout``, ``lora_options``, ...) are
    those of :class:`~lit_prune.stages.recovery.RecoveryStage`; set ``teacher`` or ``teacher_cache``.

    Args:
        pretrained: Student source: the dense model (with ``mask``) or an already pruned folder (``mask`` null);
            also feeds ``data.tokenizer``.
        mask: ``mask.json`` of the layers to drop from ``pretrained``; null when ``pretrained`` is already pruned.
        teacher_cache: Folder of cached teacher top-K logits (``python -m lit_prune cache-teacher``); no teacher is
            loaded. Set this or ``teacher``.
        teacher_k: Top-K of the teacher: with ``teacher``, restrict it to its K largest logits (as a cache would);
            with ``teacher_cache``, the K the cache must have. Null: full logits / the cache's K.
        cache_variant: How a top-K teacher (cached, or online with ``teacher_k``) enters the KL: ``tail`` (top-K
            log-probs + the remaining mass as one bucket; the default of a v2 top-K cache), ``renormalized``
            (E3-Pruner's top-K renormalised over the K ids, the paper's recipe) or ``sampled`` (ids drawn from the
            teacher with counts: an unbiased estimate of the full KD; ``teacher_k`` draws online). Null: the
            cache's default; ``renormalized`` for an online teacher with ``teacher_k``.
        kd_share: Share of the KD term: ``(1 - kd_share) * CE + kd_share * KD``; 1 = pure KD, 0 = plain CE (then no
            teacher is loaded).
        kl_direction: ``forward`` = KL(teacher || student), ``reverse`` = KL(student || teacher).
        weighting: Per-token weight from the teacher entropy H: ``none`` = plain KD (the default: it measured best,
            docs/recovery.md), ``normalized`` = H / mean(H) (mean 1; E3-Pruner's recipe), ``linear`` = 1 + beta * H;
            or ``student_selective`` (SE-KD, arXiv 2602.01395): distil only the ``select_fraction`` of each
            sequence's tokens where the *student's* entropy is highest (mean weight 1).
        beta: Slope of the ``linear`` weighting.
        select_fraction: Share of tokens ``student_selective`` distils, in (0, 1] (default 0.2, the paper's top 20%;
            1 = plain KD).
        train: What trains: ``all`` weights, ``lora`` adapters (on ``lora_layers``), or ``endpoints`` (full weights
            of the layers next to each cut).
        lora_layers: With ``train: lora``: every kept layer (``all``) or only the endpoint layers.
        ce_weight: Deprecated: the share of CE, ``1 - kd_share``; accepted for one release and converted.
        direction: Deprecated name of ``kl_direction``; accepted for one release.
    """

    def __init__(
        self,
        pretrained: str,
        mask: str | None = None,
        *,
        teacher_cache: str | None = None,
        teacher_k: int | None = None,
        cache_variant: CacheVariant | None = None,
        kd_share: float = 1.0,
        kl_direction: Direction = "forward",
        weighting: Weighting = "none",
        beta: float = 1.0,
        select_fraction: float = 0.2,
        train: TrainScope = "lora",
        lora_layers: LoraLayers = "all",
        ce_weight: float | None = None,
        direction: Direction | None = None,
        **kwargs: Any,
    ) -> None:
        if ce_weight is not None:
            check_share(ce_weight, "model.init_args.ce_weight")
            kd_share = renamed_key("ce_weight", ce_weight, "kd_share", kd_share, 1.0, 1.0 - ce_weight)
        if direction is not None:
            check_choice(direction, Direction, "model.init_args.direction")
        kl_direction = renamed_key("direction", direction, "kl_direction", kl_direction, "forward", direction)
        super().__init__(pretrained, mask, **kwargs)
        teacher = self.teacher
        check_choice(kl_direction, Direction, "model.init_args.kl_direction")
        check_choice(weighting, Weighting, "model.init_args.weighting")
        check_choice(train, TrainScope, "model.init_args.train")
        check_choice(lora_layers, LoraLayers, "model.init_args.lora_layers")
        self.kd_share = check_share(kd_share, "model.init_args.kd_share")
        if weighting == "linear" and beta < 0:
            raise ValueError(f"`model.init_args.beta` must be >= 0 (weights 1 + beta * H stay positive), got {beta}.")
        self.select_fraction = check_select_fraction(select_fraction, "model.init_args.select_fraction")
        if teacher_k is not None and (isinstance(teacher_k, bool) or teacher_k < 1):
            raise ValueError(f"`model.init_args.teacher_k` must be >= 1 or null, got {teacher_k!r}.")
        if (teacher is None) == (teacher_cache is None):
            raise ValueError(
                "Set exactly one of `model.init_args.teacher` (a dense model run online) and "
                f"`model.init_args.teacher_cache` (a cache-teacher folder); got teacher={teacher!r}, "
                f"teacher_cache={teacher_cache!r}."
            )
        self.teacher_k = teacher_k
        if cache_variant is not None:
            check_choice(cache_variant, CacheVariant, "model.init_args.cache_variant")
        self.cache_variant = cache_variant
        self.cache: TopKCache | None = None
        if teacher is not None:
            config = self.check_teacher(teacher)
            if teacher_k is not None and teacher_k > config.vocab_size:
                raise ValueError(
                    f"`model.init_args.teacher_k`={teacher_k} exceeds the teacher's vocabulary ({config.vocab_size})."
                )
        else:
            try:
                self.cache = TopKCache(teacher_cache, cache_variant)
            except TeacherCacheError as err:
                raise ValueError(f"`model.init_args.teacher_cache`={teacher_cache!r}: {err}") from None
            source = self.mask.model if self.mask is not None else canonical_model_id(pretrained)
            self.cache.check_compatible(
                vocab_size=int(self.config.vocab_size), k=teacher_k, model=source,
                allow_model_mismatch=self.allow_model_mismatch,
            )
        self.kl_direction, self.weighting, self.beta = kl_direction, weighting, beta
        self.train_scope, self.lora_layers = train, lora_layers
        if train == "endpoints":
            self.require_endpoints("`model.init_args.train: endpoints`")
        if train == "lora":
            layers = self.require_endpoints("`model.init_args.lora_layers: endpoints`") if lora_layers == "endpoints" \
                else None
            self.check_lora(layers)

    def adds_lora(self) -> bool:
        return self.train_scope == "lora"

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # The block length is the DataModule's: compare it with the cache before any weight loads.
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        max_length = getattr(getattr(datamodule, "hparams", None), "max_length", None)
        if self.cache is not None and max_length is not None:
            self.cache.check_compatible(seq_len=int(max_length))
        train_set = getattr(datamodule, "train_set", None)
        if self.cache is not None and train_set is not None:  # other corpus/tokenizer/split: refused before weights
            self.cache.check_blocks(train_set)

    def on_model_loaded(self) -> None:
        self.build_student()
        if self.teacher is not None and self.kd_share > 0:  # kd_share 0 is plain CE: no teacher needed
            self.load_teacher(self.teacher)
        self.train(self.training)  # from_pretrained returns eval mode; LoRA dropout needs train mode (teacher: eval)

    def build_student(self) -> None:
        self.prepare_student()
        if self.train_scope == "all":
            for param in self.model.parameters():
                param.requires_grad_(True)
        elif self.train_scope == "endpoints":
            layers = decoder_layers(self.model)
            for index in self.endpoints:
                for param in layers[index].parameters():
                    param.requires_grad_(True)
        else:
            self.wrap_lora(self.endpoints if self.lora_layers == "endpoints" else None)

    def teacher_outputs(self, input_ids: Tensor) -> Teacher:
        """Full teacher logits, or a top-K pair (from the cache, or the online teacher cut to ``teacher_k``)."""
        if self.cache is not None:
            return self.cache.lookup(input_ids)
        logits = self.teacher_logits(input_ids)
        if self.teacher_k is None:
            return logits
        if self.cache_variant == "tail":
            indices, logprobs, tail = topk_with_tail(logits, self.teacher_k)
            return SparseTeacher(indices, logprobs, tail=tail)
        if self.cache_variant == "sampled":
            indices, logprobs, counts = sample_teacher(logits, self.teacher_k)
            return SparseTeacher(indices, logprobs, counts=counts)
        # Log-probs rather than logits: the same renormalised loss, rounded as a cache stores it.
        indices, values = topk_teacher(F.log_softmax(logits.float(), dim=-1), self.teacher_k)
        return indices.long(), values

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        input_ids, labels = batch["input_ids"], batch["labels"]
        logits = self(input_ids)
        ce = next_token_ce(logits, labels)
        logs = {"train/ce": ce}
        kd = None
        if self.kd_share > 0:
            teacher = self.teacher_outputs(input_ids)
            terms = entropy_aware_kd_terms(
                logits, teacher, labels, self.kl_direction, self.kd_temperature, self.weighting, self.beta,
                select_fraction=self.select_fraction,
            )
            kd = terms.loss()
            weight_mean = terms.scored_mean(terms.weights)
            # Weights of unscored positions are 0 here, so the max is over scored tokens (weights are >= 0).
            logs.update({
                "train/kd": kd,
                "train/teacher_entropy": terms.scored_mean(terms.entropy),
                "train/entropy_weight_mean": weight_mean,
                "train/entropy_weight_std": (terms.scored_mean(terms.weights**2) - weight_mean**2).clamp(min=0).sqrt(),
                "train/entropy_weight_max": (terms.weights * terms.mask).max(),
            })
            if isinstance(teacher, SparseTeacher) and teacher.tail is not None:  # mass outside the teacher's top-K
                logs["train/teacher_tail_mass"] = terms.scored_mean(teacher.tail.to(terms.mask.device).float().exp())
        loss = kd_ce_mix(ce, kd, self.kd_share)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(logs)
        return loss

"""Parameters of the steering evaluation (:class:`SteeringParams`), kept apart from the sweep
so that configs can name them without importing generation, plotting or the model."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["Control", "Mode", "SteeringParams"]

Mode = Literal["clamp_max", "clamp", "add", "scale", "mean_diff"]
Control = Literal["alpha0", "random", "own_label"]


MEAN_DIFF_STRENGTHS = (4.0, 6.0, 8.0, 10.0, 12.0, 16.0)
"""``mode="mean_diff"``: the strengths swept unless given (multiples of the mean difference)."""
MEAN_DIFF_GROUP = 256
"""``mode="mean_diff"``: latents per label's group unless ``group_size`` is given."""


class SteeringParams(BaseModel):
    """What :func:`evaluate_steering` sweeps and how it scores it."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        allow_inf_nan=False,
    )

    latents: list[int] | Literal["auto"] = "auto"
    """Latents to steer, or ``auto``: the most enriched latents of each label (``labels``)."""
    labels: list[str] | None = None
    """``auto``: the target labels (default: every label). Explicit latents: one target label per latent (default: each latent's most enriched label)."""
    per_label: int = Field(1, ge=1)
    """``auto``: latents picked per label."""
    group_size: int = Field(1, ge=1)
    """``auto``: latents steered together per label (``mode="mean_diff"`` without it: 256). Above 1, each label's edit acts on its ``group_size`` best latents by ``rank_by`` at once, each with the swept strength (``clamp_max``: each clamped to strength x its own max activation), and the random control edits as many random latents, each matched to a member's decoder norm. A topic is often split over several latents; steering them together moves it with less damage to fluency than pushing one latent harder. Needs ``per_label=1`` and no pilot."""
    q_max: float = Field(1e-3, gt=0, le=1)
    """A picked latent's token-level enrichment q-value must be below this."""
    rank_by: Literal["doc_q", "token_q", "log_odds", "vocab_logit", "vocab_gain", "mean_diff"] = (
        "doc_q"
    )
    """Order of the significant latents: document-level q (broad, label-specific latents first), token-level q, token-level log odds, or ``vocab_logit``: among the ``candidates`` best by document-level q, those whose decoder direction promotes the label's target vocabulary most through the unembedding; or ``vocab_gain``: among the same candidates, those whose clamp (``gain_strength`` x max activation) raises the target vocabulary's probability most through the whole model, teacher-forced on the unsteered continuations of ``gain_prompts`` topic-neutral fitting openings (``abstain_prompts``, never the evaluation's prompts); or ``mean_diff`` (with ``mode="mean_diff"``): every latent by its difference of mean document code, the label's training documents against the other labels' (largest first, positive only; no significance filter)."""
    candidates: int = Field(16, ge=1)
    """``rank_by="vocab_logit"`` / ``"vocab_gain"``: enriched latents per label scored."""
    gain_strength: float = Field(0.35, gt=0)
    """``rank_by="vocab_gain"``: the clamp each candidate is scored at, x its max activation."""
    gain_prompts: int = Field(24, ge=1)
    """``rank_by="vocab_gain"``: fitting openings whose continuations the candidates are scored on."""
    n_top: int = Field(20, ge=1)
    """Top activating tokens per latent in the token-level enrichment test."""
    mode: Mode = "clamp_max"
    """Edit swept: ``clamp_max`` (clamp to strength x the latent's max activation in the store), ``clamp`` (to strength), ``add`` (strength x decoder row), ``scale``, or ``mean_diff`` (with ``rank_by="mean_diff"``: add strength x the latent's difference of mean document code to its code; with a group of many latents, strength x the SAE's view of the label's mean-difference steering vector, so strength 1 moves an average token's code by the whole difference)."""
    strengths: list[float] = Field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0, 2.0])
    """Strengths of the sweep, run in increasing order (``clamp_max``: fractions of the latent's max activation, a log grid over the useful range; ``mode="mean_diff"`` without strengths: 4, 6, 8, 10, 12, 16 x the mean difference)."""
    positions: str | list[str] = "all"
    """Steered positions: ``last_prompt``, ``prompt``, ``generated``, ``all`` (or a list of them)."""
    prompts: list[str] | None = None
    """Neutral prompts (default: ``data.neutral_prompts()``)."""
    max_new_tokens: int = Field(24, ge=1)
    """Tokens generated per continuation."""
    do_sample: bool = True
    """Sample (``True``) or decode greedily."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    samples_per_prompt: int = Field(4, ge=1)
    """Continuations per prompt (with sampling): 12 neutral prompts x 4 = 48 per set, enough for a 95% interval of at most +/- 0.15 on a share."""
    seed: int = 0
    """Seed of sampling and of the random control latent."""
    batch_size: int = Field(64, ge=1)
    """Most continuations per ``generate`` batch: a generation call (several sets that do not wait on each other) runs in the fewest batches of at most this many rows, of equal size."""
    keep_error: bool = True
    """Keep the SAE error term (``x + dec(z') - dec(z)``); False replaces ``x`` by ``dec(z')``."""
    controls: list[Control] = Field(default_factory=lambda: ["alpha0", "random", "own_label"])
    """Control rows to add."""
    random_draws: int = Field(3, ge=1)
    """Independent draws of the ``random`` control's latents (each latent or group member replaced by a random latent, its edit scaled to the member's decoder norm), each run at every control strength. Draw 0 runs on the sweep's sample indices (the single draw of ``random_draws=1``); draw ``g > 0`` on sample indices of its own after the confirmation's, beside one unsteered set on the same indices that every latent shares. With several draws the ``random`` row (``prompts="random"``) pools them: ``n`` is ``random_draws`` x continuations, its share and interval count all of them, and its lift and perplexity ratio are against the row ``unsteered`` with ``prompts="random"`` (the unsteered sets of the same indices). One draw measures one direction on one sample of 48; the pool measures what an edit of that size in no chosen direction does to the share. The summary gives each draw's share."""
    control_strengths: Literal["best", "all"] = "best"
    """Strengths of the ``random`` and ``own_label`` controls: the target's best strength within the fluency bound (``best``), or every strength the target ran (``all``)."""
    early_stop: bool = True
    """Run the strengths in rounds of one continuation per prompt, round r of every strength still running (of every latent) in one generation call. After each round but the last, every running strength is decided at once from its rows so far: it ends when the 95% lower bound of its perplexity exceeds ``ppl_ratio_max`` x unsteered (``perplexity``), or when the 95% upper bound of its share is below the 95% lower bound of the share of another running strength of the same latent whose perplexity's 95% upper bound is within ``ppl_ratio_max`` x unsteered (``cannot win``: another strength is surely fluent and surely better). A strength that ended early is never the best, so the best strength and the controls always have all ``samples_per_prompt`` continuations (the unsteered sets, the classifier check and the controls run in full, in one call per group). False (or ``stop_above_ppl=False``): every strength runs in full; with ``stop_above_ppl``, in increasing order, one call per strength for all latents."""
    refine: int = Field(1, ge=0)
    """Rounds of refinement after the grid. Where a latent's strongest strength within the fluency bound is followed by a stronger one beyond it whose share beat every fluent share, one more set runs in full at their geometric mean, and each round halves the bracket again (0: the grid only). The fluency bound then limits the best share, not the grid's spacing. The refined sets use the same sample indices as the grid's."""
    confirm: bool = True
    """Run each latent's best strength again, and the unsteered model, on fresh sample indices (after the sweep's and the pilot's), in the controls' call: rows ``control="confirm"`` and ``control="unsteered"`` with ``prompts="confirm"``, and the summary's ``confirmed_*`` fields. The best strength is the highest of several noisy shares, so its own share leans high; the confirmation's is an estimate the choice never saw. Needs sampling: with ``do_sample=False`` every sample is the same continuation, so none runs."""
    stop_above_ppl: bool = True
    """Stop a latent's sweep after the first strength whose perplexity exceeds ``ppl_ratio_max`` x unsteered (stronger edits only get less fluent)."""
    pilot_candidates: int = Field(1, ge=1)
    """``latents="auto"``: each label's best latents by ``rank_by`` tried in a pilot before the sweep; the one with the highest pilot share within the fluency bound (ties: the better ranked) is swept (1: no pilot, the best ranked is swept). The pilot's continuations use sample indices after the sweep's (``samples_per_prompt`` on), so the shares the sweep reports are fresh draws, not the ones the pick was made on."""
    pilot_strengths: list[float] = Field(default_factory=lambda: [0.25, 0.5])
    """Strengths of the pilot (same mode as the sweep)."""
    pilot_samples: int = Field(1, ge=1)
    """Continuations per neutral prompt per pilot strength."""
    own_label_prompts: int = Field(12, ge=1)
    """Prompts cut from held-out documents of each label: the ``own_label`` control and the classifier check."""
    own_prompt_words: int = Field(5, ge=1)
    """``own_label`` control: words kept from each document as its prompt."""
    vocab_per_label: int = Field(50, ge=1)
    """Target vocabulary: most enriched token ids per label."""
    vocab_min_count: int = Field(5, ge=1)
    """Target vocabulary: a token must occur at least this often in the store."""
    vocab_words_only: bool = True
    """Target vocabulary: keep only tokens that read as words (three or more letters)."""
    classifier_test_fraction: float = Field(0.05, gt=0, lt=1)
    """The classifier is fitted on the store's training documents and scored on its held-out ones: ``store.split_mask('test', classifier_test_fraction, split_seed)``, the split SAE training uses."""
    split_seed: int = 0
    """Seed of the store's document-level split (0: the split SAE training and evaluation use)."""
    check_labels: Literal["all", "targets"] = "all"
    """Labels whose own prompts check the classifier on unsteered generations: every label (also detects a classifier that predicts one label whatever the text), or only the target labels."""
    judge_margin: float = Field(0.2, ge=0, lt=1)
    """The classifier can judge generations toward a label when it predicts that label for at least chance + this margin of the unsteered continuations of the label's own prompts."""
    classifier_c: Annotated[float, Field(gt=0)] | Literal["cv"] = "cv"
    """Inverse regularisation strength of the classifier's and the text judge's logistic regressions: a number, or ``cv`` (each fit chooses its own by the lowest weighted log loss over three stratified folds of its training rows: the classifier from ``CLASSIFIER_CS``, 1e-4 to 1, the text judge from ``TEXT_JUDGE_CS``, 0.01 to 100, in decade steps). A 640-wide activation classifier fitted on a few thousand documents overfits at 1.0."""
    classifier_fit: Literal["documents", "generations", "both"] = "both"
    """What the classifier is fitted on: the store's training documents, the model's own continuations of their openings (``classifier_fit_generations`` per label, ``max_new_tokens`` long, labelled by the source document), or both (each source half the weight). Continuations are what it judges; documents alone misread them."""
    classifier_fit_generations: int = Field(48, ge=1)
    """Continuations per label generated for the classifier's fit (one per training document, its first ``own_prompt_words`` words as the prompt)."""
    classifier_abstain: bool = True
    """The classifier may assign a continuation to no label: a ``none`` class fitted on the unsteered model's continuations of topic-neutral openings (``abstain_prompts``, never the evaluation's ``prompts``; ``classifier_fit_generations`` of them, one per opening), weighted as one more label. A continuation assigned to ``none`` counts as a miss for every label, and the tables give the share assigned to it (``abstain``). False: a forced choice among the labels, so text of no label still gets one and a topic-neutral edit keeps the unsteered share."""
    abstain_prompts: list[str] | None = None
    """Topic-neutral openings the ``none`` class is fitted on (default: ``data.neutral_fit_prompts()``); none of them may be one of the evaluation's ``prompts``."""
    text_judge: bool = True
    """Also judge every set with a :class:`~integral_superposition.steering.classifier.TextJudge`: logistic regression on the words of the text (TF-IDF of words and word pairs), fitted on the classifier's own texts and weights. Each row then has a second share (``text_share``, with its interval and lift) that no activation of the model enters; the sweep's decisions follow the classifier alone."""
    classifier_balanced: bool = True
    """Every label carries the same total weight in the classifier's fit, so that no label is its default answer for text of no label."""
    ppl_ratio_max: float = Field(2.0, gt=1)
    """Fluency bound: the summary's best strength keeps perplexity within this factor of unsteered."""
    hook_point: str | None = None
    """Where to steer (default: the store's hook point, where the SAE was trained)."""
    device: str = "auto"
    """Torch device of the SAE scan: ``auto`` (the model's), ``cpu``, ``cuda:0``, ..."""

    @property
    def confirms(self) -> bool:
        """Whether the confirmation runs: ``confirm`` with sampling (greedy decoding has no
        fresh samples to draw)."""
        return self.confirm and self.do_sample

    @model_validator(mode="after")
    def _group(self) -> SteeringParams:
        if self.group_size > 1:
            if self.latents != "auto":
                raise ValueError(
                    f"group_size={self.group_size} with explicit latents: expected "
                    "latents='auto' (groups are each label's best latents)"
                )
            if self.per_label != 1 or self.pilot_candidates != 1:
                raise ValueError(
                    f"group_size={self.group_size} with per_label={self.per_label} and "
                    f"pilot_candidates={self.pilot_candidates}: expected per_label=1 and "
                    "pilot_candidates=1 (one group per label, no pilot)"
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def _mean_diff_defaults(cls, data):
        """``mode="mean_diff"`` without ``strengths`` / ``group_size``: the grid and the group
        it needs (the ``clamp_max`` defaults would not move the text)."""
        if isinstance(data, dict) and data.get("mode") == "mean_diff":
            data = dict(data)
            data.setdefault("strengths", list(MEAN_DIFF_STRENGTHS))
            data.setdefault("group_size", MEAN_DIFF_GROUP)
        return data

    @model_validator(mode="after")
    def _mean_diff(self) -> SteeringParams:
        if (self.mode == "mean_diff") != (self.rank_by == "mean_diff"):
            raise ValueError(
                f"mode={self.mode!r} with rank_by={self.rank_by!r}: expected mode='mean_diff' "
                "and rank_by='mean_diff' together (the edit adds each latent's mean difference)"
            )
        if self.mode == "mean_diff" and self.latents != "auto":
            raise ValueError(
                f"mode='mean_diff' with latents={self.latents}: expected latents='auto' (the "
                "latents with the largest difference of mean document code)"
            )
        return self

    @field_validator("strengths", "pilot_strengths")
    @classmethod
    def _strengths(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("strengths is empty: expected at least one strength")
        if any(not math.isfinite(s) for s in v):
            raise ValueError(f"strengths={v}: expected finite numbers")
        if len(set(v)) != len(v):
            raise ValueError(f"strengths={v}: expected distinct strengths")
        return sorted(v)

    @field_validator("prompts", "abstain_prompts")
    @classmethod
    def _prompts(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError(
                "prompts is empty: expected at least one prompt (or None for the neutral prompts)"
            )
        blank = [i for i, s in enumerate(v or []) if not s]
        if blank:
            raise ValueError(
                f"prompts[{blank[0]}]={v[blank[0]]!r} is empty: expected text to steer"
            )
        return v

    @field_validator("latents")
    @classmethod
    def _latents(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("latents is empty: expected latent indices or 'auto'")
            if any(j < 0 for j in v):
                raise ValueError(f"latents={v}: expected non-negative latent indices")
        return v

"""The hook specification: every extension point of a policy-optimization method.

Every policy-gradient method for language models optimizes J(theta) = E_{tau ~ p_theta}[R(tau)] and changes one
or both of its factors. The stages below follow the order in which the trainer calls them, grouped by factor:

- **reward side**, R(tau): reward shaping, dense per-token rewards, advantage estimation.
- **trajectory side**, p_theta(tau): sample and group selection (which samples enter the update, dynamic
  sampling), token masks, importance weights, rollout correction, the per-token policy objective, token
  penalties, loss aggregation, loss penalties.

Reward shaping, advantages and sample/group selection run once per generation batch on the *globally gathered*
batch, where a prompt's G completions are still contiguous rows (the trainer shuffles rows before the loss); the
other trajectory-side stages run once per micro-batch on the local rows.
- **lifecycle**: methods, options, set-up and checkpoint state.

A stage is **single-owner** (exactly one plugin implements it in an assembled pipeline; two claimants are an
error at assembly that names both) or **composable** (every implementation contributes, combined as the stage
says: folded, multiplied, summed or intersected). A plugin implements a stage by defining a function of the
same name marked with :data:`po_registry.hookimpl`. Arguments are opt-in: an implementation takes only the
arguments it reads, so a specification can grow without breaking older plugins.

Shapes: ``N`` rows in the global generation batch, ``K`` reward functions, ``G`` completions per prompt,
``B`` local rows, ``T`` completion tokens (right-padded). Tensors returned by a hook must be floating point, on the
device of the batch, of the documented shape, and finite; the trainer checks this and names the plugin otherwise.
Shared math (masked means, group statistics, KL estimators, clipping, aggregation) is in :mod:`po_registry.ops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pluggy

PROJECT = "po_registry"
# A plugin may declare the version of this specification it was written for as ``po_registry_api = 1``
# (a module or class attribute); the registry refuses versions it does not support.
API_VERSION = 2
SUPPORTED_API_VERSIONS = frozenset({2})
# What each version changed, for the message refusing a plugin written for an older one.
API_CHANGES = {2: "po_setup receives a RunContext instead of the trainer, and po_aggregate_loss returns the "
                  "micro-batch's loss unscaled (the pipeline divides by the accumulation steps)"}
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# What a component may declare about itself as class attributes, beside its hooks; the registry checks the types
# at load (a wrong one is a load fault naming the plugin) and assembly acts on them.
COMPONENT_ATTRIBUTES = {
    "po_explain": (dict, "stage hook -> one line: what this component does there (shown by `explain`)"),
    "po_importance_level": (str, "'token' or 'sequence': the granularity of the importance weights it owns"),
    "po_reads": (tuple, "batch fields other components produce that it reads: 'token_rewards' (an advantage "
                        "estimator that adds the dense per-token rewards; assembly refuses dense rewards without one)"),
    "po_carries": (tuple, "keys its reward-side stages attach to the rollout with RewardBatch.carry (declared: carry "
                          "refuses any other key)"),
    "po_uses_carried": (tuple, "carried keys its loss stages read from LossBatch.inputs; assembly refuses a "
                               "composition in which no reward-side stage carries them"),
}
READABLE_FIELDS = frozenset({"token_rewards"})


def component_attribute_faults(plugin) -> list[str]:
    """Problems with a component's declared attributes (see :data:`COMPONENT_ATTRIBUTES`), one line each."""
    faults = []
    for name, (kind, _) in COMPONENT_ATTRIBUTES.items():
        value = getattr(plugin, name, None)
        if value is not None and not isinstance(value, kind):
            faults.append(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    if getattr(plugin, "po_importance_level", None) not in (None, "token", "sequence"):
        faults.append(f"po_importance_level must be 'token' or 'sequence', got {plugin.po_importance_level!r}")
    unknown = set(getattr(plugin, "po_reads", None) or ()) - READABLE_FIELDS
    if isinstance(getattr(plugin, "po_reads", None), tuple) and unknown:
        faults.append(f"po_reads names unknown fields {sorted(unknown)}; known: {sorted(READABLE_FIELDS)}")
    return faults

Side = Literal["reward", "trajectory", "lifecycle"]
Combine = Literal["single", "fold", "product", "sum", "all", "max", "each"]
# What a stage returns; the pipeline checks every implementation's result against it and names the plugin otherwise.
OUTPUTS = {
    "reward_matrix": "(N, K) float like the rewards it received, NaN allowed (unscored), no inf",
    "local_tokens": "(B, T) float on this process's rows, finite",
    "advantages": "(N,) or (N, T) float, finite",
    "row_keep": "(N,) bool",
    "group_keep": "(N // G,) bool",
    "rounds": "an int >= 0",
    "tokens": "(B, T) or (B, 1) float, finite",
    "scalar": "a 0-d float tensor, finite",
}


@dataclass(frozen=True)
class Stage:
    """How the pipeline runs a hook, all of it read from here: the factor it changes (``side``), how several
    implementations combine (``combine``: one owner, folded, summed, multiplied, intersected, the largest), what each
    returns (``output``, one of :data:`OUTPUTS`; None always means "no contribution" for a composable stage) and the
    short name a method selector uses for it (``--method dapo:-aggregation``). Stages run in the order of this
    module."""

    side: Side
    combine: Combine
    name: str = ""
    output: str = ""

    @property
    def single_owner(self) -> bool:
        return self.combine == "single"


def stage(side: Side, combine: Combine, name: str = "", output: str = ""):
    """Mark a hookspec with its :class:`Stage`."""

    def mark(func):
        func.po_stage = Stage(side, combine, name, output)
        return hookspec(func)

    return mark


# ---------------------------------------------------------------------------------------------------------------
# Lifecycle
# ---------------------------------------------------------------------------------------------------------------


@stage("lifecycle", "each")
def po_register_methods(register):
    """Register named methods.

    Call ``register(name, components=[...], options={...}, summary=..., targets=..., paper=..., objective=...,
    fixes=(...), risks=(...))`` once per method; its side (reward, trajectory or both) is derived from the stage
    hooks its components implement. ``components`` are plugin names (entry-point names); the method is the
    pipeline of the built-in ``grpo`` baseline with each single-owner stage taken over by the component that
    implements it and each composable component added. ``options`` are defaults for options that the components declare. ``replaces`` lists
    baseline components the method removes (for example ``["reference-kl"]`` for a method with KL in the reward).
    ``objective`` declares what the method's loss claims to follow, for the gradient oracle of the conformance suite
    (:mod:`po_registry.oracle`): a :class:`~po_registry.oracle.Objective`, or a function ``(args, options) ->
    Objective`` when it depends on the configuration. It states the claim (E[R], a KL to the reference or a teacher,
    reward shaping) and the biases by design (the advantage's baseline and scaling, the loss aggregation, dense
    rewards, KL terms in the loss, token masks and weights, dropped rows), each relative to what the baseline's
    remaining components already do; the oracle checks the mean gradient of the assembled loss against the exact
    expectation, on a policy it can enumerate. An objective that is neither is a load fault naming the method.
    ``fixes`` and ``risks`` name failure modes (:func:`po_register_failures`) the method targets and those it may
    cause; ``po-registry diagnose`` recommends it for the former. An unknown failure name is a load fault.
    Registering a name that another plugin already registered is reported as a load fault naming both plugins.
    """


@stage("lifecycle", "each")
def po_declare_options(register):
    """Declare this plugin's options.

    Call ``register(name, default, help=..., type=..., choices=..., check=...)`` once per option. ``type`` converts
    strings from the command line or YAML (int, float, bool, str); ``choices`` restricts values; ``check`` is a
    predicate ``value -> bool`` with ``help`` saying what is allowed. A bad value is rejected when the
    :class:`~po_registry.PolicyOptimizationConfig` is built, with a message naming the option and the plugin.
    Option names are global: two plugins declaring the same name is an error at assembly.
    """


@stage("lifecycle", "each")
def po_register_tasks(register):
    """Register embedded tasks for ``po-registry train --task``.

    Call ``register(task)`` with a :class:`po_registry.tasks.Task` (a problem generator, its answer check and the
    completion length it needs). A name registered twice is a load fault naming both plugins.
    """


@stage("lifecycle", "each")
def po_register_failures(register):
    """Add failure modes to the vocabulary that methods declare and detectors report.

    Call ``register(name, side, summary)``: ``side`` is ``"reward"`` or ``"trajectory"``, the factor of J where the
    failure arises; ``summary`` says in one line what goes wrong. The built-in vocabulary is in
    :data:`po_registry.diagnostics.FAILURES`. A name registered twice is a load fault naming both plugins.
    """


@stage("lifecycle", "each")
def po_register_detectors(register):
    """Add detectors: watchers of the logged metrics that report a failure during training and in
    ``po-registry diagnose``.

    Call ``register(detector)`` with a :class:`po_registry.diagnostics.Detector` (its ``name``, the ``failure`` it
    reports, the ``metrics`` it reads, its default thresholds and a ``check``; ``Level`` and ``Drift`` cover most
    cases). A detector of an unregistered failure, or a name registered twice, is a load fault.
    """


@stage("lifecycle", "each")
def po_check_config(args, options, assembly):
    """Refuse a configuration or composition this plugin cannot honour. Called when the config is built.

    ``args``: the :class:`~po_registry.PolicyOptimizationConfig` (TRL's ``GRPOConfig`` fields included);
    ``options``: the resolved option values; ``assembly``: the :class:`~po_registry.Assembly` (components by
    name, the owners of every stage), for couplings with other plugins. Raise ``ValueError`` with a message
    naming the offending field or plugin; the error reaches the user prefixed with this plugin's name.
    """


@stage("lifecycle", "each")
def po_setup(context, options):
    """Called once per run, after the trainer is constructed and before training.

    ``context``: the run's :class:`~po_registry.context.RunContext`: ``model`` (the policy, unwrapped),
    ``processing_class``, ``accelerator``, ``args``, ``add_callback`` and ``register_auxiliary(name, model)``, which
    adds an :class:`~po_registry.context.AuxiliaryModel` (a frozen teacher, a trained critic: loading, placement,
    an optimizer on the policy's schedule, averaging over processes and checkpoints are done there) that the stages
    read as ``batch.auxiliary[name]``; and ``old_logps_from_sampler``, which a component sets to True for bypass mode
    (the sampler's log-probs stand in for pi_old: the trainer does not recompute it and every stage reads the
    sampler's as ``old_logps``). ``options``: the resolved option values (dict). Each run builds its own instance of a
    plugin class, so what a component keeps on ``self`` here is this run's.
    """


@stage("lifecycle", "each")
def po_state_dict():
    """Return this plugin's state to save with a checkpoint (a dict ``torch.save`` can write), or None. (Trainable
    auxiliary models are saved and restored by the core.)"""


@stage("lifecycle", "each")
def po_load_state_dict(state):
    """Restore the state this plugin returned from :func:`po_state_dict` when a run resumes from a checkpoint."""


# ---------------------------------------------------------------------------------------------------------------
# Reward side: R(tau)
# ---------------------------------------------------------------------------------------------------------------


@stage("reward", "fold", "shaping", "reward_matrix")
def po_shape_rewards(rewards, batch):
    """Transform the reward matrix (reward shaping). Composable: folded in registration order.

    ``rewards``: (N, K) float, one column per reward function, NaN where a function returned None, already
    gathered across processes; it is the previous plugin's output when several shape rewards.
    ``batch``: :class:`~po_registry.RewardBatch` (``completion_lengths`` (N,), ``truncated`` (N,),
    ``group_ids`` (N,), ``group_size``, ``reward_names``, ``options``, ...).
    Return an (N, K) tensor, or None to leave the rewards unchanged. TRL's logged reward metrics see the shaped
    matrix.
    """


@stage("reward", "sum", "token-rewards", "local_tokens")
def po_token_rewards(batch):
    """Dense per-token rewards (process rewards, a teacher's log-ratio). Composable: summed.

    Computed on this process's rows: ``batch.local`` holds ``prompt_ids`` (B, P), ``completion_ids`` (B, T),
    ``completion_mask`` (B, T) and the rest of the rollout (``batch.local_mask``: its loss mask). Return (B, T)
    float or None. The pipeline gathers them to ``batch.token_rewards`` (N, T) of the advantage stage's batch; the
    advantage estimator decides how they combine with sequence-level advantages.
    """


@stage("reward", "single", "advantages", "advantages")
def po_compute_advantages(rewards, batch):
    """Advantage estimation. Single owner.

    ``rewards``: (N, K) shaped reward matrix; ``batch``: :class:`~po_registry.RewardBatch` of the global batch,
    with ``reward_weights`` (K,), ``group_size``, ``completion_mask`` (N, T) and ``token_rewards`` (N, T) or None.
    Return per-sequence advantages (N,) or per-token advantages (N, T). Rows whose rewards are all NaN must get
    a finite advantage (usually 0). The trainer slices this process's rows.

    ``batch.gather`` turns a (B, T) tensor computed on ``batch.local`` into (N, T) (a critic's values);
    ``batch.greedy_rewards()`` decodes, scores and shapes (as the samples) one greedy completion per prompt (a
    ReMax baseline);
    ``batch.carry(key, values)`` attaches (N,) or (N, T) per-row values that the loss stages read as
    ``LossBatch.inputs[key]`` (value targets); ``batch.rows`` are this process's input rows with what a rollout
    function added (multi-turn episodes), and ``batch.token_field(key)`` gathers a per-token list field of them
    into (N, T) (``turn_index``, ``turn_reward``, ``turn_state``).
    """


@stage("trajectory", "all", "samples", "row_keep")
def po_select_samples(rewards, batch):
    """Sample selection (overlong filtering). Composable: a completion is kept only if every plugin keeps it.

    ``rewards``: (N, K) shaped reward matrix; return a bool tensor (N,) with True for completions to keep, or
    None to keep all. Dropped completions leave the loss and the token count that normalises it (TRL's
    ``mask_truncated_completions`` semantics); their advantages are still computed with their group.
    """


@stage("trajectory", "all", "groups", "group_keep")
def po_select_groups(rewards, batch):
    """Group selection (what dynamic sampling needs). Composable: a group is kept only if every plugin keeps it.

    ``rewards``: (N, K) shaped reward matrix; return a bool tensor (N // G,) with True for groups to keep, or
    None to keep all. Dropped groups are removed from the loss: their loss mask is zeroed and the token count
    that normalises the loss is recomputed. The decision is taken on the gathered batch, so it is the same on
    every process. With :func:`po_refill_rounds`, the trainer generates fresh groups to replace dropped ones.
    """


@stage("trajectory", "max", "refill", "rounds")
def po_refill_rounds(options):
    """Dynamic sampling: how many extra generation rounds the trainer may run, per generation batch, to replace
    groups dropped by :func:`po_select_groups` with fresh prompts until the batch is full again. Composable: the
    largest answer wins. Return an int >= 0 or None. Training only; the batch size stays constant, a shortfall
    after the last round is filled with dropped groups (which carry no loss), and every process runs the same
    number of rounds (the decision is taken on counts gathered from all processes).
    """


# ---------------------------------------------------------------------------------------------------------------
# Trajectory side: p_theta(tau)
# ---------------------------------------------------------------------------------------------------------------


@stage("trajectory", "single", "importance", "tokens")
def po_log_importance_weights(batch):
    """Importance-weight granularity. Single owner.

    Return the log importance weight of pi_theta against the behaviour policy pi_old with a live gradient:
    (B, T) for token level, (B, 1) for sequence level (GSPO), or any shape that broadcasts against (B, T).
    ``batch.logps`` and ``batch.old_logps`` are (B, T); on-policy ``old_logps`` is ``logps.detach()``.
    """


@stage("trajectory", "single", "objective", "tokens")
def po_policy_objective(batch, log_weights):
    """The per-token policy objective (the clip family). Single owner.

    ``log_weights``: the output of :func:`po_log_importance_weights`; ``batch.advantages`` is (B, 1) or (B, T).
    Return the per-token loss to minimise, (B, T) or (B, 1). The trainer multiplies it by the token masks and
    rollout corrections and adds the token penalties before aggregation.
    """


@stage("trajectory", "product", "token-mask", "tokens")
def po_token_mask(batch):
    """Token masks (high-entropy tokens, off-policy sequences). Composable: multiplied.

    ``batch``: :class:`~po_registry.LossBatch`. Return a (B, T) or (B, 1) multiplier for the per-token loss
    (usually 0/1, no gradient), or None. A mask drops a token's loss but not its slot in the aggregation
    denominator (TRL's semantics); to remove tokens from the denominator too, select groups on the reward side.
    """


@stage("trajectory", "product", "correction", "tokens")
def po_rollout_correction(batch):
    """Rollout-trainer mismatch correction (TIS, MIS). Composable: multiplied.

    ``batch.sampling_logps`` (B, T) are the sampler's log-probs when it returned them (vLLM or a rollout
    function); ``batch.importance_sampling_ratio`` is TRL's own correction when ``use_vllm`` is on.
    Return a (B, T) or (B, 1) multiplier without gradient, or None.
    """


@stage("trajectory", "sum", "token-penalty", "tokens")
def po_token_penalty(batch, log_weights):
    """Per-token regularisers added to the per-token loss before aggregation (a KL to the reference). Composable:
    summed. Return (B, T) or None; include the coefficient."""


@stage("trajectory", "single", "aggregation", "scalar")
def po_aggregate_loss(per_token_loss, batch):
    """Loss aggregation. Single owner.

    ``per_token_loss``: (B, T) or (B, 1); ``batch.mask`` (B, T) is the loss mask. Return this micro-batch's
    scalar loss; the pipeline divides it (and the loss penalties) by the gradient-accumulation steps, so that the
    optimizer step averages its micro-batches. :func:`po_registry.ops.aggregate` implements the standard modes;
    ``batch.tokens_per_micro_batch`` is the normaliser of a token mean over the whole optimizer step (DAPO's).
    """


@stage("trajectory", "sum", "loss-penalty", "scalar")
def po_loss_penalty(batch):
    """Scalar regularisers added after aggregation (an entropy bonus). Composable: summed.

    Return a 0-d tensor for one micro-batch *before* gradient-accumulation scaling (the pipeline divides by
    ``batch.accumulation_steps``), or None. Include the coefficient and sign (a bonus is negative).
    ``batch.rewards`` (B,) is each row's weighted reward; ``batch.inputs`` holds what the reward side carried.
    An auxiliary model's loss (a critic's value loss) may be returned here: its gradient reaches that model's
    parameters, which the plugin steps with its own optimizer.
    """

"""``po-registry new-plugin NAME``: a complete method-plugin distribution that installs and passes its tests.

Each template is a working method for one stage, with a README carrying the fields every method README has, and
tests: the conformance suite plus a test of the formula on hand-computed values.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Template:
    hook: str
    side: str
    summary: str
    formula: str
    option: tuple[str, str, str]  # (name, default literal, help)
    imports: str  # import lines the body needs
    body: str  # the component class body after the registration hooks
    test: str  # a formula test (uses po_reward_batch / po_loss_batch fixtures)


TEMPLATES = {
    "advantages": Template(
        hook="po_compute_advantages",
        side="reward",
        summary="group-mean baseline with a scaled advantage",
        formula="A_i = scale * (R_i - mean_G(R))",
        option=("{module}_scale", "1.0", "advantage multiplier, > 0"),
        imports="from po_registry import hookimpl\nfrom po_registry.ops import group_mean\n",
        body='''
    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        """A_i = scale * (R_i - mean_G(R)); rows whose every reward is NaN get 0."""
        total = batch.weighted_reward(rewards)
        advantages = batch.options["{module}_scale"] * (total - group_mean(total, batch.group_size))
        return advantages.nan_to_num(0.0)
''',
        test='''
def test_formula_on_a_hand_computed_group(po_reward_batch):
    rewards = torch.tensor([[1.0], [0.0], [0.0], [1.0], [1.0], [1.0], [1.0], [1.0]])
    _, batch = po_reward_batch(group_size=4, num_groups=2, rewards=rewards, options={{"{module}_scale": 2.0}})
    advantages = {klass}().po_compute_advantages(rewards, batch)
    assert torch.allclose(advantages, torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
''',
    ),
    "objective": Template(
        hook="po_policy_objective",
        side="trajectory",
        summary="PPO clipped surrogate with its own symmetric clip range",
        formula="l_t = -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)",
        option=("{module}_epsilon", "0.2", "clip range, in (0, 1)"),
        imports="import torch\n\nfrom po_registry import hookimpl\nfrom po_registry.ops import clipped_surrogate\n",
        body='''
    @hookimpl
    def po_policy_objective(self, batch, log_weights):
        """l_t = -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)."""
        epsilon = batch.options["{module}_epsilon"]
        return clipped_surrogate(torch.exp(log_weights), batch.advantages, epsilon, epsilon)
''',
        test='''
def test_formula_at_and_beyond_the_clip_boundary(po_loss_batch):
    batch = po_loss_batch(rows=2, width=3, options={{"{module}_epsilon": 0.2}})
    batch.advantages = torch.tensor([[1.0], [-1.0]])
    ratios = torch.tensor([[1.0, 1.2, 1.5], [0.5, 0.8, 1.1]])
    loss = {klass}().po_policy_objective(batch, ratios.log())
    assert torch.allclose(loss, torch.tensor([[-1.0, -1.2, -1.2], [0.8, 0.8, 1.1]]))
''',
    ),
    "shaping": Template(
        hook="po_shape_rewards",
        side="reward",
        summary="a length penalty on every reward column",
        formula="r_i <- r_i - coef * |o_i| / L_max",
        option=("{module}_coef", "0.1", "penalty per fraction of the length cap, >= 0"),
        imports="from po_registry import hookimpl\n",
        body='''
    @hookimpl
    def po_shape_rewards(self, rewards, batch):
        """r_i <- r_i - coef * |o_i| / L_max, on every reward column."""
        penalty = batch.options["{module}_coef"] * batch.completion_lengths / batch.max_completion_length
        return rewards - penalty.unsqueeze(1).to(rewards.dtype)
''',
        test='''
def test_formula_on_known_lengths(po_reward_batch):
    rewards, batch = po_reward_batch(group_size=2, num_groups=1, width=4, options={{"{module}_coef": 0.5}},
                                     completion_lengths=torch.tensor([2, 4]))
    shaped = {klass}().po_shape_rewards(rewards, batch)
    assert torch.allclose(shaped, rewards - torch.tensor([[0.25], [0.5]]))
''',
    ),
}

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


class ScaffoldError(ValueError):
    """A name or place the scaffold refuses; the message is one line."""


def check_name(name: str, directory: Path) -> str:
    """The module name for ``name``, or a ScaffoldError saying why the name cannot be used."""
    from .registry import get_registry

    if not NAME_PATTERN.match(name):
        raise ScaffoldError(f"invalid plugin name {name!r}: use lowercase letters, digits and single dashes, "
                            "starting with a letter (e.g. 'my-method')")
    module = name.replace("-", "_")
    if keyword.iskeyword(module) or not module.isidentifier():
        raise ScaffoldError(f"invalid plugin name {name!r}: {module!r} is not a valid Python module name")
    if importlib.util.find_spec(module) is not None:
        raise ScaffoldError(f"plugin name {name!r}: a package named {module!r} is already installed")
    registry = get_registry()
    if name in registry.plugins or name in registry.methods:
        raise ScaffoldError(f"plugin name {name!r}: a plugin or method of that name is already registered")
    if (directory / name).exists():
        raise ScaffoldError(f"folder {directory / name} already exists")
    return module


def generate(name: str, stage: str = "advantages", directory: Path | str = ".") -> Path:
    """Write the distribution ``directory/name`` and return its path."""
    directory = Path(directory)
    if stage not in TEMPLATES:
        raise ScaffoldError(f"unknown stage template {stage!r}; choose one of {', '.join(TEMPLATES)}")
    module = check_name(name, directory)
    template = TEMPLATES[stage]
    klass = "".join(part.capitalize() for part in module.split("_"))
    fill = {"name": name, "module": module, "klass": klass}
    option_name, option_default, option_help = (part.format(**fill) for part in template.option)
    root = directory / name
    (root / module).mkdir(parents=True)
    (root / "tests").mkdir()

    (root / "pyproject.toml").write_text(textwrap.dedent(f'''\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "0.1.0"
        description = "po-registry method plugin: {template.summary}"
        readme = "README.md"
        requires-python = ">=3.10"
        dependencies = ["po-registry"]

        [project.entry-points.po_registry]
        {name} = "{module}:{klass}"

        [tool.setuptools]
        packages = ["{module}"]
        '''))
    (root / module / "__init__.py").write_text(
        f'"""{name}: {template.summary}.\n\nFormula: {template.formula}\n"""\n\n'
        + template.imports
        + "\n\n"
        f"class {klass}:\n"
        f'    """{template.summary[0].upper() + template.summary[1:]} ({template.side} side, stage {template.hook})."""\n\n'
        "    @hookimpl\n"
        "    def po_register_methods(self, register):\n"
        f'        register("{name}", components=["{name}"], summary="{template.summary}",\n'
        '                 targets="TODO: the failure this method fixes",\n'
        '                 paper="TODO: arXiv id")\n\n'
        "    @hookimpl\n"
        "    def po_declare_options(self, register):\n"
        f'        register("{option_name}", {option_default}, type=float, help="{option_help}",\n'
        f"                 check=lambda value: value {'>=' if stage == 'shaping' else '>'} 0"
        f"{' and value < 1' if stage == 'objective' else ''})\n"
        + template.body.format(**fill)
    )
    (root / "tests" / f"test_{module}.py").write_text(
        f'"""Tests of {name}: the conformance suite, the formula on hand-computed values, a training run."""\n\n'
        "import torch\n\n"
        "from po_registry.testing import PluginConformance\n"
        f"from {module} import {klass}\n\n\n"
        "class TestConformance(PluginConformance):\n"
        f'    method = "{name}"\n\n'
        + template.test.format(**fill)
    )
    (root / "README.md").write_text(textwrap.dedent(f"""\
        # {name}

        A [po-registry](https://pypi.org/project/po-registry/) method plugin.

        | field | value |
        |---|---|
        | what it changes | {template.summary} |
        | side | {template.side} (stage `{template.hook}`) |
        | failure it fixes | TODO |
        | formula | `{template.formula}` |
        | paper | TODO |

        ## Options

        | option | default | meaning |
        |---|---|---|
        | `{option_name}` | {option_default} | {option_help} |

        ## Use

        ```bash
        pip install ./{name}
        po-registry train --method {name} --option {option_name}={option_default}
        python -m pytest {name}/tests
        ```
        """))
    return root

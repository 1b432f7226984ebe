"""The stage table is the one home of each stage's names: the compiled pipeline, the CLI and the tracked runs use
exactly those names (KFP component names and MLflow run names are persisted in lineage tags)."""

import yaml

from caopd.cli import build_parser
from caopd.config.stages import STAGES
from caopd.pipelines import COMPILED_PIPELINE


def test_every_stage_id_names_a_component_of_the_compiled_pipeline():
    spec = next(yaml.safe_load_all(COMPILED_PIPELINE.read_text()))
    components = {name.removeprefix("comp-") for name in spec["components"]}
    assert {stage.id for stage in STAGES} <= components


def test_every_stage_is_a_cli_command_whose_options_are_its_config_fields():
    commands = build_parser()._subparsers._group_actions[0].choices
    for stage in STAGES:
        options = {opt for action in commands[stage.cli]._actions for opt in action.option_strings}
        for name, field in stage.config.model_fields.items():
            if stage.cli == "register" and name == "metrics":  # read from an evaluation summary (--metrics FILE)
                continue
            nested = isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields")
            flag = f"--{name.replace('_', '-')}"
            assert nested or flag in options, f"caopd {stage.cli} has no {flag}"


def test_stage_ids_and_commands_are_unique():
    assert len({s.id for s in STAGES}) == len({s.cli for s in STAGES}) == len(STAGES)

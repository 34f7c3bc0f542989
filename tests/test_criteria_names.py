"""The light list of criterion names that recipe validation reads is the criteria registry's."""
from compress.stages.criteria_names import CRITERION_NAMES
from compress.structured.criteria import IMPORTANCES


def test_criterion_names_match_the_registry():
    assert sorted(CRITERION_NAMES) == IMPORTANCES.names()

import argparse

import pytest


@pytest.fixture
def make_parser(monkeypatch):
    """Makes pretrain_gpt_mhc.py's argument parser: Megatron's flags and the mHC ones."""
    from megatron.training.arguments import add_megatron_arguments

    from megatron_mhc.training.arguments import add_mhc_arguments

    monkeypatch.setattr("sys.argv", ["pretrain_gpt_mhc.py"])  # no --config: flags only

    def make():
        parser = argparse.ArgumentParser(allow_abbrev=False)
        return add_mhc_arguments(add_megatron_arguments(parser))

    return make


@pytest.fixture
def parser(make_parser):
    return make_parser()

"""The experiment harness: configs from the command line (``config``), run directories bound to their config and
locked (``run``), staged result files with provenance (``results``). Experiment scripts use it; nothing under
``eejax/models``, ``eejax/eval``, ``eejax/exits`` or ``eejax/nn`` imports it."""

"""Adapters for the frameworks that own the training loop.

One module per framework, each a thin layer over the public API (``step``,
``accumulate``, ``weighted_loss``, ``state_dict``), never a second implementation of the
step:

- :mod:`multitask_optim.integrations.transformers`: ``MultiTaskTrainer``, a Hugging
  Face ``transformers.Trainer`` (``pip install -e ".[transformers]"`` in the checkout);
- :mod:`multitask_optim.integrations.lightning`: ``MultiTaskModule`` for PyTorch
  Lightning, automatic or manual optimization (``pip install -e ".[lightning]"`` in the checkout).

Accelerate needs no adapter: ``accelerator.prepare`` takes a ``MultiTaskOptimizer`` as
it is (see the Accelerate guide). Importing this package needs none of the frameworks;
importing one of its modules without its framework raises an ``ImportError`` that names
the extra to install.
"""

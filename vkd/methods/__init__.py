"""Unlearning methods: a module each under this package (``vkd.py``; the baselines in
``baselines.py``), on one base (``base.py``) and one set of losses (``losses.py``). A method
is a class registered by name (``@register``) with its config dataclass, whose fields are
YAML ``unlearn.<method>.<field>``; ``method_for`` builds the one a config asks for. Every
module of this package is imported here, so a new method is one new module."""
import importlib
import pkgutil

from vkd.methods.base import (METHODS, FineTune, FineTuneConfig, Method, MethodConfig, Preparation, StepContext,
                              method_for, register)

for _module in pkgutil.iter_modules(__path__):  # fill the registry
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "FineTune", "FineTuneConfig", "Method", "MethodConfig", "Preparation", "StepContext",
           "method_for", "register"]

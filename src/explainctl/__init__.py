"""explainctl: meaningful-perturbation explanations of image classifiers at audit scale.

This package is the light side (CLI, configuration, job records, storage, report);
it never imports torch. The torch side lives in `explainctl_worker`.

The Python API (explainctl.api) is reached from here by name, loaded on first use:
`load_model`, `explain`, `Attribution`, `explain_func`, `Client`, `example_images`;
torch is imported only when one of them runs a model.
"""

__version__ = "0.1.0"

API = ("load_model", "explain", "Attribution", "explain_func", "Client", "example_images")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from explainctl import api

        return getattr(api, name)
    raise AttributeError(f"module 'explainctl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])

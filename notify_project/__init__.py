from .celery import app as celery_app

__version__ = "0.5.0"  # notify_build_info{version}; raised with each release
__all__ = ["__version__", "celery_app"]

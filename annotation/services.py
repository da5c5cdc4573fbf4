"""Kept only for studyapp/services/studies.py, which still imports the pool's import from here: the
question pool's writer lives in annotation.writers (and the participant's journey, which was here, in
studyapp.services). Delete this module once studies.py imports annotation.writers."""

from .writers import PoolImported, question_pool_import

__all__ = ["PoolImported", "question_pool_import"]

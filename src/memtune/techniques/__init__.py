"""memtune's memory techniques as one ordered registry (see registry.py)."""

from memtune.techniques.registry import (BY_NAME, TECHNIQUES, ApplyReport, Target, Technique, apply_techniques,
                                         remove_techniques)

__all__ = ["TECHNIQUES", "BY_NAME", "Technique", "Target", "ApplyReport", "apply_techniques", "remove_techniques"]

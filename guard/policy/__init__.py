"""The access policy: Cedar policies, schema and entities, and the decisions taken with them.

Owns: `engine` (`PolicyEngine`: load a policy directory, validate it against its schema, decide one
request or a batch, cache decisions, reload without a restart keeping the running policy on a bad
reload), `model` (the entity model's names, building entity and context documents), `sources` (entities
from the branch database's staff and role tables).
May import: `guard.errors` (nothing else of `guard`: the pipeline and the reveal service consult it).
Layer 3b of docs/architecture.md, between `classify` and `records`.
"""

from guard.policy.engine import Decision, PolicyEngine, PolicyError, Request
from guard.policy.model import ACTIONS, FIELD_CLASSES, context, entity_uid

__all__ = ["ACTIONS", "FIELD_CLASSES", "Decision", "PolicyEngine", "PolicyError", "Request", "context", "entity_uid"]

"""Queries and inserts on the ledger, one small function each; callers own the session/transaction.

Nothing here deletes a row: facts and operations change by status updates and new rows
(`set_request_status` appends to a fact's history in the same transaction).

A package of seven modules (facts, operations, history, targets, artifacts, audits, lifelong); everything is
re-exported here, so `from knowledger.ledger import repository as repo; repo.x(...)` keeps working.
"""
from __future__ import annotations

from knowledger.ledger.repository.facts import (Added, pending_duplicate, add_requests,
                                                get_request, list_requests,
                                                count_requests_by_status, set_request_status,
                                                request_history, superseded_facts,
                                                requests_by_ids, pending_requests)
from knowledger.ledger.repository.operations import (add_base_model, current_base_model,
                                                     DeltaFactors, FactVectors, TargetVector,
                                                     knowledger_version, OPERATION_SEQ, next_seq,
                                                     take_seq, record_operation, load_delta,
                                                     operation_deltas, list_operations,
                                                     count_operations, operation_request_counts,
                                                     request_operations)
from knowledger.ledger.repository.history import (DELTA_KINDS, get_operation_by_seq, lineage,
                                                  active_operations, is_undone, head_operation,
                                                  running_operations, operation_facts,
                                                  operation_vectors, link_requests, active_facts,
                                                  load_vectors, active_fact_links, active_vectors,
                                                  count_operations_since, weight_changes)
from knowledger.ledger.repository.targets import (load_target, operation_targets, active_targets,
                                                  add_anchor, find_anchor, list_anchors)
from knowledger.ledger.repository.artifacts import (register_artifact, artifact_by_sha,
                                                    get_artifact, list_artifacts, artifact_shas,
                                                    get_setting, set_setting, all_settings)
from knowledger.ledger.repository.audits import (AuditFact, record_audit_run, list_audit_runs,
                                                 last_audit_run, audit_results, StoredMemory,
                                                 load_memory, save_memory, memory_as_of)
from knowledger.ledger.repository.lifelong import (BATCH, STATE, StoredMoments, save_lifelong, operation_lifelong,
                                                   latest_lifelong_state, count_lifelong_rows,
                                                   active_batch_counts)

__all__ = ['Added', 'pending_duplicate', 'add_requests', 'get_request', 'list_requests',
           'count_requests_by_status', 'set_request_status', 'request_history',
           'superseded_facts', 'requests_by_ids', 'pending_requests', 'add_base_model',
           'current_base_model', 'DeltaFactors', 'FactVectors', 'TargetVector', 'knowledger_version',
           'OPERATION_SEQ', 'next_seq', 'take_seq', 'record_operation', 'load_delta',
           'operation_deltas', 'list_operations', 'count_operations', 'operation_request_counts',
           'request_operations', 'DELTA_KINDS', 'get_operation_by_seq', 'lineage',
           'active_operations', 'is_undone', 'head_operation', 'running_operations',
           'operation_facts', 'operation_vectors', 'link_requests', 'active_facts',
           'load_vectors', 'active_fact_links', 'active_vectors', 'count_operations_since',
           'load_target', 'operation_targets', 'active_targets', 'add_anchor', 'find_anchor',
           'list_anchors',
           'register_artifact', 'artifact_by_sha', 'get_artifact', 'list_artifacts',
           'artifact_shas', 'get_setting', 'set_setting', 'all_settings', 'AuditFact',
           'record_audit_run', 'list_audit_runs', 'last_audit_run', 'audit_results',
           'StoredMemory', 'load_memory', 'save_memory', 'memory_as_of', 'weight_changes', 'BATCH', 'STATE', 'StoredMoments', 'save_lifelong',
           'operation_lifelong', 'latest_lifelong_state', 'active_batch_counts', 'count_lifelong_rows']

"""The protection engine against the real key store (Redis): no plaintext survives, ciphertexts are bound
to their place, keys are durable and shared, rotation keeps old data readable, erasure and legal hold."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
import uuid

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.config import load_settings
from guard.errors import IntegrityError, KeyShreddedError, KeyUnavailableError, SubjectRestrictedError
from guard.pipeline.runtime import build_keys, build_sanitizer
from guard.protect.reveal import open_image
from guard.records.codec import decode
from guard.workload import synth
from tests.integration.kafka_helpers import REPO, kafka_conf, wait_for

pytestmark = pytest.mark.integration

SOURCE = {"connector": "postgresql", "db": "branch_0101", "schema": "public", "lsn": 1, "ts_ms": 1}


def _settings(stack: dict[str, str], **overrides):
    return load_settings(None, kafka_bootstrap=stack["GUARD_KAFKA_BOOTSTRAP"], redis_url=stack["GUARD_REDIS_URL"],
                         **overrides)


@pytest.fixture(scope="module")
def branch_settings(stack):
    """A branch of its own, so these tests' keys and erasures touch nobody else's."""
    return _settings(stack, branch=f"t{uuid.uuid4().hex[:8]}", worker_id="test-protection")


@pytest.fixture(scope="module")
def sanitizer(branch_settings):
    san = build_sanitizer(branch_settings)
    san.act_on_deletes = False
    return san


def event(table: str, after: dict | None, before: dict | None = None, op: str = "c", source_ts_ms: int = 1) -> bytes:
    return json.dumps({"before": before, "after": after, "op": op, "ts_ms": 2,
                       "source": dict(SOURCE, table=table, ts_ms=source_ts_ms)}, ensure_ascii=False,
                      default=str).encode()


def customer(rng: random.Random, cid: int) -> dict:
    row = synth.new_customer(rng, cid)
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}


def sanitize(san, table: str, key: dict, value: bytes):
    topic = f"br0101.public.{table}"
    out = san.process(topic, 0, 1, json.dumps(key).encode(), value)
    assert out.decision != "dlq", out
    main = out.records[0]
    return main, decode(main.value), out


# --- no plaintext survives ------------------------------------------------------------------------
identifier = st.sampled_from(["rid", "mobile", "card", "name", "addr", "email", "uscc", "text"])


def _value(kind: str, seed: int) -> str:
    rng = random.Random(seed)
    return {"rid": synth.resident_id, "mobile": synth.mobile, "card": synth.bank_card, "name": synth.chinese_name,
            "addr": synth.address, "email": synth.email, "uscc": synth.uscc,
            "text": lambda r: "备注" + "".join(r.choice("abcdefg0123456789") for _ in range(12))}[kind](rng)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(columns=st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{2,10}", fullmatch=True),
                               st.tuples(identifier, st.integers(0, 2**32)), min_size=1, max_size=6),
       seed=st.integers(0, 2**32))
def test_no_plaintext_of_generated_rows_survives(sanitizer, columns, seed):
    rng = random.Random(seed)
    cust = customer(rng, rng.randrange(10**6, 10**7))
    # a catalogued table
    main, record, out = sanitize(sanitizer, "customers", {"customer_id": cust["customer_id"]},
                                 event("customers", cust))
    secrets = [str(cust[c]) for c in ("name", "id_number", "mobile", "email", "address", "occupation")]
    blob = b"".join((r.key or b"") + (r.value or b"") for r in out.records)
    for s in secrets:
        assert s.encode() not in blob
    # an unknown table: every column is protected, whatever its name says
    row = {name: _value(kind, s) for name, (kind, s) in columns.items()}
    table = "drift_" + uuid.uuid4().hex[:6]
    main, record, out = sanitize(sanitizer, table, {"id": 1}, event(table, row))
    blob = b"".join((r.key or b"") + (r.value or b"") for r in out.records)
    for value in row.values():
        assert value.encode() not in blob
    assert set(record["unclassified"]) == set(row)
    after = record["after"]
    protected = set((after["sealed"] or {}).get("fields", [])) | set(after["dropped"]) | set(after["hashed"])
    assert protected == set(row) and not after["clear"]  # names that look like secrets (e.g. *mm, 密码) are dropped


# --- ciphertexts are bound to their place ---------------------------------------------------------
def test_ciphertext_moved_between_rows_images_topics_or_fields_fails(sanitizer):
    rng = random.Random(7)
    topic = "sanitized.br0101.public.customers"
    a, b = customer(rng, 9_000_001), customer(rng, 9_000_002)
    rec_a, doc_a, _ = sanitize(sanitizer, "customers", {"customer_id": a["customer_id"]}, event("customers", a))
    rec_b, doc_b, _ = sanitize(sanitizer, "customers", {"customer_id": b["customer_id"]}, event("customers", b))
    assert open_image(sanitizer.keys, doc_a, "after", topic=topic, row_key=rec_a.key)["name"] == a["name"]
    # row A's sealed fields pasted into row B's record (same table, same key material available)
    swapped = {**doc_b, "after": {**doc_b["after"], "sealed": doc_a["after"]["sealed"]}}
    with pytest.raises(IntegrityError):
        open_image(sanitizer.keys, swapped, "after", topic=topic, row_key=rec_b.key)
    # same subject, another row key
    with pytest.raises(IntegrityError):
        open_image(sanitizer.keys, doc_a, "after", topic=topic, row_key=rec_b.key)
    # another topic
    with pytest.raises(IntegrityError):
        open_image(sanitizer.keys, doc_a, "after", topic=topic + "-copy", row_key=rec_a.key)
    # fields relabelled (e.g. to read the ID number out as the name)
    fields = list(doc_a["after"]["sealed"]["fields"])
    fields[0], fields[1] = fields[1], fields[0]
    relabelled = {**doc_a, "after": {**doc_a["after"], "sealed": {**doc_a["after"]["sealed"], "fields": fields}}}
    with pytest.raises(IntegrityError):
        open_image(sanitizer.keys, relabelled, "after", topic=topic, row_key=rec_a.key)
    # after image presented as the before image
    moved = {**doc_a, "before": doc_a["after"]}
    with pytest.raises(IntegrityError):
        open_image(sanitizer.keys, moved, "before", topic=topic, row_key=rec_a.key)


def test_an_older_image_of_the_same_row_cannot_be_replayed_into_a_newer_record(sanitizer):
    """Finding 13: the associated data binds op and source position, so an old image of a row (an earlier
    update, at an earlier LSN) pasted into a newer record of the same row, subject and fields fails."""
    rng = random.Random(13)
    topic = "sanitized.br0101.public.customers"
    c = customer(rng, 9_000_013)
    key = {"customer_id": c["customer_id"]}

    def update(name: str, lsn: int) -> bytes:
        doc = json.loads(event("customers", {**c, "name": name}, op="u"))
        doc["source"]["lsn"] = lsn
        return json.dumps(doc, ensure_ascii=False).encode()

    rec_old, doc_old, _ = sanitize(sanitizer, "customers", key, update("旧名字", 1000))
    rec_new, doc_new, _ = sanitize(sanitizer, "customers", key, update("新名字", 2000))
    assert rec_old.key == rec_new.key and doc_old["subject"] == doc_new["subject"]
    assert doc_new["v"] == 2 and doc_new["position"] != doc_old["position"]
    assert open_image(sanitizer.keys, doc_new, "after", topic=topic, row_key=rec_new.key)["name"] == "新名字"
    replayed = {**doc_new, "after": doc_old["after"]}
    with pytest.raises(IntegrityError):
        open_image(sanitizer.keys, replayed, "after", topic=topic, row_key=rec_new.key)
    with pytest.raises(IntegrityError):  # nor relabelled as another op
        open_image(sanitizer.keys, {**doc_new, "op": "c"}, "after", topic=topic, row_key=rec_new.key)


def test_a_column_only_the_before_image_has_is_named_and_alerted_like_the_afters(stack):
    """An update whose before image has a column the catalog doesn't know (dropped since, or renamed): it was
    sealed, but neither alerted nor named in the record's and the audit's `unclassified`, which only read the
    after image's plan."""
    san = build_sanitizer(_settings(stack, branch=f"t{uuid.uuid4().hex[:8]}", worker_id="t-drift-before"))
    san.act_on_deletes = False
    row = customer(random.Random(12), 880_001)
    gone = f"ssn_old_{uuid.uuid4().hex[:8]}"  # alerted once per tenant, table and column: a name of its own
    _, doc, out = sanitize(san, "customers", {"customer_id": 880_001},
                           event("customers", row, before={**row, gone: "650102200202209319"}, op="u"))
    assert gone in doc["unclassified"], doc["unclassified"]
    [audit] = [decode(r.value) for r in out.records if r.topic == san.settings.audit_topic]
    assert gone in audit["unclassified"], audit
    alerts = [a for r in out.records if r.topic == san.settings.anomalies_topic
              if (a := orjson.loads(r.value))["rule"] == "schema_drift_unclassified_column"]
    assert [a["column"] for a in alerts] == [gone], alerts
    assert b"650102200202209319" not in b"".join(r.value or b"" for r in out.records)


def test_the_same_customer_id_in_two_branches_names_two_people(stack):
    """Finding 10: customer ids are per-branch surrogates, so the subject token is of (branch, id): the same
    id in two branches gives two tokens (two keys), and one person keeps one token across a branch's tables."""
    rng = random.Random(10)
    first = build_sanitizer(_settings(stack, branch=f"t{uuid.uuid4().hex[:8]}", worker_id="t10-a"))
    second = build_sanitizer(_settings(stack, branch=f"t{uuid.uuid4().hex[:8]}", worker_id="t10-b"))
    for san in (first, second):
        san.act_on_deletes = False
    c = customer(rng, 4242)
    _, doc_1, _ = sanitize(first, "customers", {"customer_id": 4242}, event("customers", c))
    _, doc_2, _ = sanitize(second, "customers", {"customer_id": 4242}, event("customers", c))
    assert doc_1["subject"] != doc_2["subject"]
    assert first.keys.subject_token(first.branch, 4242) != first.keys.subject_token(second.branch, 4242)
    account = {"account_no": synth.bank_card(rng), "customer_id": 4242, "status": "active"}
    _, doc_acc, _ = sanitize(first, "accounts", {"account_id": 77}, event("accounts", account))
    assert doc_acc["subject"] == doc_1["subject"]


def test_each_image_is_sealed_under_its_own_subject(stack):
    """Finding 6: an update that moves a row from customer A to customer B seals the before image under
    A's key and the after image under B's, so erasing A leaves A's old data unreadable (it was readable
    with B's key) and B's data readable."""
    san = build_sanitizer(_settings(stack, branch=f"t{uuid.uuid4().hex[:8]}", worker_id="t6-move"))
    san.act_on_deletes = False
    topic = "sanitized.br0101.public.accounts"
    a_row = {"account_no": "6222020200006000001", "customer_id": 601, "status": "active", "balance": "5.00"}
    b_row = {**a_row, "customer_id": 602, "balance": "7.00"}
    rec, doc, _ = sanitize(san, "accounts", {"account_id": 60}, event("accounts", b_row, before=a_row, op="u"))
    token_a, token_b = san.keys.subject_token(san.branch, 601), san.keys.subject_token(san.branch, 602)
    assert doc["subject"] == token_b and doc["before_subject"] == token_a
    assert open_image(san.keys, doc, "before", topic=topic, row_key=rec.key)["balance"] == "5.00"
    assert open_image(san.keys, doc, "after", topic=topic, row_key=rec.key)["balance"] == "7.00"
    # the before image does not open under B's key (as if it named B)
    with pytest.raises(IntegrityError):
        open_image(san.keys, {**doc, "before_subject": None}, "before", topic=topic, row_key=rec.key)
    san.erase(token_a, trigger="erase_command", reason_code="subject_request", reason="test", by="test")
    with pytest.raises(KeyShreddedError):
        open_image(san.keys, doc, "before", topic=topic, row_key=rec.key)
    assert open_image(san.keys, doc, "after", topic=topic, row_key=rec.key)["balance"] == "7.00"
    # an update of a row that stays with one customer names no before subject
    _, same, _ = sanitize(san, "accounts", {"account_id": 61}, event("accounts", b_row, before=b_row, op="u"))
    assert same["before_subject"] is None


def test_rows_without_a_subject_get_a_key_of_their_own_that_their_delete_erases(stack):
    """Finding 6: rows whose subject column is null or unusable no longer share a table-wide key that no
    erasure reaches: each is sealed under a per-row key (of branch, table, row key), an anomaly names the
    table once, the row's delete destroys its key, and a row with neither subject nor key is keyed per change."""
    san = build_sanitizer(_settings(stack, branch=f"t{uuid.uuid4().hex[:8]}", worker_id="t6-rows"))
    topic = "sanitized.br0101.public.accounts"
    rows = [{"account_no": f"622202020000700000{i}", "customer_id": cid, "status": "active", "balance": f"{i}.00"}
            for i, cid in enumerate([None, None, "", True])]
    out = [sanitize(san, "accounts", {"account_id": 700 + i}, event("accounts", row)) for i, row in enumerate(rows)]
    subjects = [doc["subject"] for _, doc, _ in out]
    assert len(set(subjects)) == len(rows)  # one key per row, not one per table
    alerts = [orjson.loads(r.value) for _, _, o in out for r in o.records if r.topic == "guard.anomalies"]
    # (these synthetic changes name no principal: the access policy's `write_unattributed` alerts are
    # tests/integration/test_policy.py's concern)
    assert [a["rule"] for a in alerts if a["rule"] != "write_unattributed"] == ["rows_without_data_subject"]
    for (rec, doc, _), row in zip(out, rows, strict=True):
        assert open_image(san.keys, doc, "after", topic=topic, row_key=rec.key)["balance"] == row["balance"]
    # the delete of row 0 erases its own key, and only its own
    key0 = json.dumps({"account_id": 700}).encode()
    deleted = san.process("br0101.public.accounts", 0, 9, key0, event("accounts", None, before=rows[0], op="d"))
    confirmations = [orjson.loads(r.value) for r in deleted.records if r.topic == "guard.deletions"]
    assert [(c["subject"], c["trigger"]) for c in confirmations] == [(subjects[0], "row_delete")]
    san.keys.forget(san.branch, subjects[0])
    with pytest.raises(KeyShreddedError):
        open_image(san.keys, out[0][1], "after", topic=topic, row_key=out[0][0].key)
    assert open_image(san.keys, out[1][1], "after", topic=topic, row_key=out[1][0].key)["balance"] == "1.00"
    # no subject and no primary key (or an offline run): keyed per change, by where it was read
    keyless = san.process("br0101.public.accounts", 0, 10, None, event("accounts", rows[1]))
    again = san.process("br0101.public.accounts", 0, 11, None, event("accounts", rows[1]))
    subjects_keyless = {decode(o.records[0].value)["subject"] for o in (keyless, again)}
    assert keyless.decision == again.decision == "protected"
    assert len(subjects_keyless) == 2 and not subjects_keyless & set(subjects)


def test_the_reveal_side_opens_images_without_any_index_key(stack, branch_settings, sanitizer):
    """Finding 1: blind-index keys stay in the sanitizer; a reveal-side key manager opens images but can
    neither load the index root nor compute a token (so it can't test guesses of a masked mobile)."""
    rng = random.Random(101)
    c = customer(rng, 9_000_101)
    rec, doc, _ = sanitize(sanitizer, "customers", {"customer_id": c["customer_id"]}, event("customers", c))
    reveal = build_keys(branch_settings, listen=False, indexes=False)
    topic = "sanitized.br0101.public.customers"
    assert open_image(reveal, doc, "after", topic=topic, row_key=rec.key)["mobile"] == c["mobile"]
    with pytest.raises(KeyUnavailableError):
        reveal.search_token("mobile", c["mobile"].encode())
    # per-field keys: the same digits indexed as another field give another token
    assert doc["after"]["index"]["mobile"] == sanitizer.keys.search_token("mobile", c["mobile"].encode())
    assert doc["after"]["index"]["mobile"] != sanitizer.keys.search_token("id_number", c["mobile"].encode())


def test_erasure_tombstones_a_compacted_topic_until_compaction_removes_the_customer(stack):
    """Finding 1: no sanitized topic is compacted by default (the guard creates them with the broker's
    `delete` policy), but where one is, its latest record per key would stay forever. Erasure writes a
    tombstone for every key whose latest record is the erased customer's (not for a row that moved to
    another customer), the confirmation says so, and the log cleaner then removes the customer's records."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from guard.kafka.clients import TopicManager
    from tests.integration.kafka_helpers import read_all

    bootstrap = stack["GUARD_KAFKA_BOOTSTRAP"]
    prefix = f"bc{uuid.uuid4().hex[:8]}"
    settings = _settings(stack, branch=f"t{uuid.uuid4().hex[:8]}", worker_id="t1-compact", raw_topic_prefix=prefix)
    raw_topic = f"{prefix}.public.accounts"
    out_topic = settings.sanitized_prefix + raw_topic
    admin = AdminClient(kafka_conf(bootstrap))
    admin.create_topics([NewTopic(out_topic, 1, 1, config={
        "cleanup.policy": "compact", "segment.ms": "1000", "min.cleanable.dirty.ratio": "0.001",
        "delete.retention.ms": "1000", "min.compaction.lag.ms": "0", "max.compaction.lag.ms": "5000"})])[
        out_topic].result(timeout=30)
    san = build_sanitizer(settings)
    san.act_on_deletes = False
    san.topic_configs = TopicManager(admin).configs
    producer = Producer({**kafka_conf(bootstrap), "enable.idempotence": True})

    def publish(records) -> None:
        for r in records:
            if r.topic == out_topic:
                producer.produce(r.topic, r.value, r.key, partition=r.partition or 0)
        assert producer.flush(30) == 0

    def account(account_id: int, customer_id: int, before: int | None = None) -> tuple[bytes, bytes]:
        row = {"account_no": f"62220202000{account_id:08d}", "customer_id": customer_id, "status": "active"}
        old = None if before is None else {**row, "customer_id": before}
        return json.dumps({"account_id": account_id}).encode(), event("accounts", row, before=old,
                                                                      op="c" if before is None else "u")

    x, y = 8101, 8102
    changes = [account(1, x), account(2, x), account(3, x), account(4, y), account(3, y, before=x)]
    outputs = [san.process(raw_topic, 0, i, k, v) for i, (k, v) in enumerate(changes)]
    assert all(o.decision == "protected" for o in outputs)
    publish([r for o in outputs for r in o.records])
    keys = {o.records[0].key for o in outputs}
    x_keys = {outputs[0].records[0].key, outputs[1].records[0].key}  # account 3 moved to y: not x's any more
    token_x = san.keys.subject_token(settings.branch, x)
    records = san.erase(token_x, trigger="erase_command", reason_code="subject_request", reason="test", by="test")
    tombstones = [r for r in records if r.topic == out_topic]
    assert {r.key for r in tombstones} == x_keys and all(r.value is None and r.partition == 0 for r in tombstones)
    confirmation = orjson.loads(records[0].value)
    [remains] = [e for e in confirmation["remains"] if e.get("topic") == out_topic]
    assert remains["cleanup_policy"] == "compact" and remains["tombstones_written"] == 2
    assert remains["until_ms"] == confirmation["at_ms"] + 5000
    publish(records)

    def x_values(recs) -> set[bytes]:
        return {r.key for r in recs if r.value is not None and r.key in x_keys}

    assert x_values(read_all(bootstrap, out_topic)) == x_keys  # until the cleaner runs
    deadline = time.monotonic() + 120
    while x_values(read_all(bootstrap, out_topic)) and time.monotonic() < deadline:
        producer.produce(out_topic, b"roll", b"roll", partition=0)  # a new record rolls the active segment
        producer.flush(10)
        time.sleep(2)
    remaining = read_all(bootstrap, out_topic)
    assert not x_values(remaining), "compaction did not remove the erased customer's records"
    assert {r.key for r in remaining if r.value is not None} >= keys - x_keys  # y's records stay


# --- keys: rotation, durability, sharing ----------------------------------------------------------
def test_rotation_new_version_encrypts_old_still_decrypts(sanitizer):
    rng = random.Random(11)
    topic = "sanitized.br0101.public.customers"
    c = customer(rng, 9_100_001)
    rec1, doc1, _ = sanitize(sanitizer, "customers", {"customer_id": c["customer_id"]}, event("customers", c))
    v1 = doc1["after"]["sealed"]["ct"][1:5]
    assert sanitizer.keys.rotate_subject_key(sanitizer.branch, doc1["subject"]) == 2
    sanitizer.keys.rotate_branch_key(sanitizer.branch)
    rec2, doc2, _ = sanitize(sanitizer, "customers", {"customer_id": c["customer_id"]}, event("customers", c))
    assert doc2["after"]["sealed"]["ct"][1:5] != v1
    assert open_image(sanitizer.keys, doc1, "after", topic=topic, row_key=rec1.key)["mobile"] == c["mobile"]
    assert open_image(sanitizer.keys, doc2, "after", topic=topic, row_key=rec2.key)["mobile"] == c["mobile"]


def test_keys_survive_a_guard_restart_and_a_redis_restart(stack, branch_settings, sanitizer):
    from guard import stack as local_stack

    rng = random.Random(13)
    topic = "sanitized.br0101.public.customers"
    c = customer(rng, 9_200_001)
    rec, doc, _ = sanitize(sanitizer, "customers", {"customer_id": c["customer_id"]}, event("customers", c))
    # a new process's key manager (a restarted guard) opens it
    fresh = build_keys(branch_settings, listen=False)
    assert open_image(fresh, doc, "after", topic=topic, row_key=rec.key)["id_number"] == c["id_number"]
    local_stack.restart("redis")
    after_restart = build_keys(branch_settings, listen=False)
    assert open_image(after_restart, doc, "after", topic=topic, row_key=rec.key)["id_number"] == c["id_number"]


def test_two_workers_share_keys_even_when_racing_to_create_them(branch_settings):
    workers = [build_sanitizer(branch_settings) for _ in range(2)]
    rng = random.Random(17)
    rows = [customer(rng, 9_300_000 + i) for i in range(40)]
    results: dict[int, list] = {0: [], 1: []}

    def run(i: int) -> None:
        for row in rows:
            results[i].append(sanitize(workers[i], "customers", {"customer_id": row["customer_id"]},
                                       event("customers", row)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    topic = "sanitized.br0101.public.customers"
    for i, other in ((0, 1), (1, 0)):
        for (rec, doc, _), row in zip(results[i], rows, strict=True):
            assert open_image(workers[other].keys, doc, "after", topic=topic, row_key=rec.key)["name"] == row["name"]


# --- erasure on request, legal hold, retention ----------------------------------------------------
def _guard(stack, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guard.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_guard_erase_shreds_and_legal_hold_keeps_storage_only(stack, branch_settings, sanitizer):
    import os

    env = {**os.environ, **stack, "GUARD_BRANCH": branch_settings.branch}
    rng = random.Random(19)
    topic = "sanitized.br0101.public.customers"
    erased, held = customer(rng, 9_400_001), customer(rng, 9_400_002)
    rec_e, doc_e, _ = sanitize(sanitizer, "customers", {"customer_id": erased["customer_id"]},
                               event("customers", erased))
    rec_h, doc_h, _ = sanitize(sanitizer, "customers", {"customer_id": held["customer_id"]}, event("customers", held))
    assert _guard(stack, "hold", "--subject", str(held["customer_id"]), env=env).returncode == 0
    done = _guard(stack, "erase", "--subject", str(erased["customer_id"]), "--reason", "subject_request",
                  "--by", "dpo@bank", env=env)
    assert done.returncode == 0, done.stderr
    confirmation = json.loads(done.stdout)
    assert confirmation["outcome"] == "shredded" and confirmation["by"] == "dpo@bank"
    assert confirmation["subject"] == doc_e["subject"] and confirmation["keys_destroyed"]
    kept = _guard(stack, "erase", "--subject", str(held["customer_id"]), "--reason", "subject_request",
                  "--by", "dpo@bank", env=env)
    assert json.loads(kept.stdout)["outcome"] == "held_storage_only"
    sanitizer.keys.forget(sanitizer.branch, doc_e["subject"])
    with pytest.raises(KeyShreddedError):
        open_image(sanitizer.keys, doc_e, "after", topic=topic, row_key=rec_e.key)
    # changed with issue 13 (finding 7): a held customer is storage-only, its data is kept but not revealed
    with pytest.raises(SubjectRestrictedError):
        open_image(sanitizer.keys, doc_h, "after", topic=topic, row_key=rec_h.key)
    assert not sanitizer.keys.is_erased(sanitizer.branch, doc_h["subject"])
    deletions = wait_for(stack["GUARD_KAFKA_BOOTSTRAP"], "guard.deletions", lambda rs: {
        orjson.loads(r.value)["subject"] for r in rs if r.value} >= {doc_e["subject"], doc_h["subject"]})
    assert deletions
    # a change committed before the erasure but processed after it flows without its protected fields
    key = json.dumps({"customer_id": erased["customer_id"]}).encode()
    late = sanitizer.process("br0101.public.accounts", 0, 2, key, event("accounts", {
        "account_no": "6222020200001234567", "customer_id": erased["customer_id"], "balance": "10.00"},
        source_ts_ms=int(time.time() * 1000) - 60_000))
    assert late.decision == "erased_late"
    late_doc = decode(late.records[0].value)
    assert late_doc["after"]["sealed"] is None and "account_no" in late_doc["after"]["erased"]
    assert b"6222020200001234567" not in late.records[0].value
    # a write committed after the erasure is refused (DLQ + anomaly), not silently re-keyed
    out = sanitizer.process("br0101.public.customers", 0, 3, key, event(
        "customers", erased, source_ts_ms=int(time.time() * 1000) + 60_000))
    assert out.decision == "dlq" and out.dlq_reason == "subject_erased"
    assert any(r.topic == "guard.anomalies" for r in out.records)


def test_retention_sweep_erases_expired_subjects(stack, branch_settings, tmp_path):
    """Retention runs from the end of the relationship as the data says it (changed with issue 13, finding
    3: it used to run from the last change, so a dormant customer whose relationship lasts was erased)."""
    catalog = tmp_path / "catalog.toml"
    catalog.write_text((REPO / "schemas" / "catalog.toml").read_text().replace(
        'on_delete = { meaning = "erasure", reason_code = "art47_1_purpose_achieved", grace_s = 30 }',
        'on_delete = { meaning = "relationship_end" }'))
    settings = _settings(stack, branch=f"r{uuid.uuid4().hex[:8]}", worker_id="test-retention", catalog=str(catalog))
    san = build_sanitizer(settings)
    rng = random.Random(23)
    c = customer(rng, 9_500_001)
    _, doc, _ = sanitize(san, "customers", {"customer_id": c["customer_id"]}, event("customers", c))
    san.keys.store.record_subject_activity(settings.branch, san.pending_activity())
    from guard.erasure.service import sweep_retention

    far = time.time() + 1826 * 86_400  # the catalog keeps customers 1825 days
    assert sweep_retention(settings, now=far) == []  # the relationship goes on: kept, however dormant
    ended = san.process("br0101.public.customers", 0, 2, json.dumps({"customer_id": c["customer_id"]}).encode(),
                        event("customers", None, before=c, op="d", source_ts_ms=int(time.time() * 1000)))
    assert ended.decision == "protected"
    san.keys.store.set_expiry(settings.branch, san.take_expiries(san.root_changes()))
    assert sweep_retention(settings, now=time.time()) == []  # nothing expired yet
    confirmations = sweep_retention(settings, now=far)
    assert [c["subject"] for c in confirmations] == [doc["subject"]]
    assert confirmations[0]["reason_code"] == "art47_2_retention_expired"
    assert confirmations[0]["trigger"] == "retention_expiry"
    assert san.keys.is_erased(settings.branch, doc["subject"])


def test_batch_prefetch_loads_every_key_in_one_round_trip(branch_settings):
    san = build_sanitizer(branch_settings)
    rng = random.Random(29)
    rows = [customer(rng, 9_600_000 + i) for i in range(30)]
    values = [event("customers", row) for row in rows]
    topic = "br0101.public.customers"
    batch = [(topic, 0, i, v) for i, v in enumerate(values)] + [(topic, 0, 99, b"{broken")]
    calls = []
    real = san.keys.store.send_get_or_create_deks
    san.keys.store.send_get_or_create_deks = lambda *a, **k: calls.append(1) or real(*a, **k)
    real_single = san.keys.store.get_or_create_dek
    san.keys.store.get_or_create_dek = lambda *a, **k: calls.append("single") or real_single(*a, **k)
    san.prefetch(batch)
    outcomes = [san.process(topic, 0, i, json.dumps({"customer_id": r["customer_id"]}).encode(), v)
                for i, (r, v) in enumerate(zip(rows, values, strict=True))]
    broken = san.process(topic, 0, 99, None, b"{broken")
    assert calls == [1], calls  # one pipelined round trip, no per-event key lookups
    assert all(o.decision == "protected" for o in outcomes)
    assert broken.decision == "dlq" and broken.dlq_reason == "invalid_json"


def test_stored_data_keys_load_into_the_extension_on_every_path(branch_settings, monkeypatch):
    """Keys another worker created are unwrapped inside the extension, never into Python bytes
    (`KeyWrapper.unwrap` is not called), through a batch's prefetch, a single miss and the reveal side's
    versioned read; each is a natively held key of its version that seals what the creator's key opens."""
    from guard.keys.primitives import Aead, KeyWrapper
    from guard.protect.fastpath import native_available

    if not native_available():
        pytest.fail("guard_native is not installed: run `make venv` (needs cargo), or NATIVE=0")
    branch = branch_settings.branch
    creator = build_sanitizer(branch_settings).keys
    subjects = [f"native-load-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    made = {s: creator.subject_aead(branch, s) for s in subjects}
    batch, single, reader = (build_sanitizer(branch_settings).keys for _ in range(3))
    for manager in (batch, single, reader):
        manager._kek(branch)  # the branch key itself is unwrapped by the KMS, not by a KeyWrapper

    def python_unwrap(self, wrapped, key_name):
        raise AssertionError(f"{key_name} was unwrapped into Python bytes")

    monkeypatch.setattr(KeyWrapper, "unwrap", python_unwrap)
    batch.prefetch(branch, set(subjects))
    loaded = {"prefetch": Aead.of_cache_entry(batch._deks[(branch, subjects[0])][0]),
              "single miss": single.subject_aead(branch, subjects[1])}
    sealed = made[subjects[2]].seal(b"x", b"aad")
    loaded["versioned read"] = reader.subject_aead_for(branch, subjects[2], sealed)
    assert batch.keys_created == single.keys_created == 0
    for (how, aead), subject in zip(loaded.items(), subjects, strict=True):
        assert aead._aead is None and aead.sealing_key is not None, how
        assert aead.version == made[subject].version, how
        assert made[subject].open(aead.seal(b"secret", b"aad"), b"aad") == b"secret", how


def test_a_batch_prefetch_refreshes_keys_about_to_expire(branch_settings):
    """A key that would expire while its batch is processed is fetched again with the batch, in the same
    round trip: not one round trip of its own in the middle of the batch."""
    import time as _time

    from guard.keys.manager import REFRESH_MARGIN

    keys = build_sanitizer(branch_settings).keys
    branch = branch_settings.branch
    keys.prefetch(branch, {"refresh-a", "refresh-b"})
    fetched: list[list[str]] = []
    real = keys.store.send_get_or_create_deks
    keys.store.send_get_or_create_deks = lambda b, items: fetched.append(sorted(s for s, _ in items)) or real(b, items)
    keys.prefetch(branch, {"refresh-a", "refresh-b"})
    assert fetched == [], "fresh keys are not fetched again"
    aead, _ = keys._deks[(branch, "refresh-a")]
    keys._deks[(branch, "refresh-a")] = (aead, _time.monotonic() + keys._ttl * REFRESH_MARGIN / 2)
    keys.prefetch(branch, {"refresh-a", "refresh-b"})
    assert fetched == [["refresh-a"]]
    assert keys._deks[(branch, "refresh-a")][1] > _time.monotonic() + keys._ttl * REFRESH_MARGIN



def test_a_steady_prefetch_reads_keys_first_and_offers_keys_only_to_new_subjects(branch_settings, monkeypatch):
    """While most of a prefetch's keys exist, the next one reads them first (`get_deks`): no key is minted
    and wrapped for a known customer; only the subjects without a key are offered one, in a second round
    trip; erased subjects are answered as erased. While most are new, keys are offered at once (one round
    trip). The keys loaded either way are the ones the creator sealed with."""
    from guard.keys.primitives import KeyWrapper

    branch = branch_settings.branch
    creator = build_keys(branch_settings, listen=False)
    known = [f"steady-{uuid.uuid4().hex[:8]}" for _ in range(8)]
    made = {s: creator.subject_aead(branch, s) for s in known}
    erased = f"steady-erased-{uuid.uuid4().hex[:8]}"
    creator.subject_aead(branch, erased)
    creator.shred(branch, erased, b"{}")
    keys = build_sanitizer(branch_settings).keys  # another worker: none of these keys is cached
    deadline = time.monotonic() + 30
    while keys._invalidations == 0:  # its listener's start drops the cache once: wait for it to be over
        assert time.monotonic() < deadline, "the key invalidation listener did not start"
        time.sleep(0.02)
    calls: list[tuple[str, int]] = []
    wraps: list[str] = []
    read, offer = keys.store.send_get_deks, keys.store.send_get_or_create_deks
    monkeypatch.setattr(keys.store, "send_get_deks", lambda b, subjects: calls.append(("read", len(subjects)))
                        or read(b, subjects))
    monkeypatch.setattr(keys.store, "send_get_or_create_deks",
                        lambda b, items: calls.append(("offer", len(items))) or offer(b, items))
    real_mint = KeyWrapper.mint_aeads
    monkeypatch.setattr(KeyWrapper, "mint_aeads",
                        lambda self, names, version: wraps.extend(names) or real_mint(self, names, version))

    # A new worker offers at once; the store kept none of its offers (all existed): read first from now on.
    keys.prefetch(branch, set(known[:4]))
    assert calls == [("offer", 4)] and len(wraps) == 4 and keys.keys_created == 0
    calls.clear()
    wraps.clear()
    new = f"steady-new-{uuid.uuid4().hex[:8]}"
    keys.prefetch(branch, {*known[4:], erased, new})
    assert calls == [("read", 6), ("offer", 1)], calls
    assert wraps == [f"dek/{branch}/{new}"], "a key was minted and wrapped for a customer who has one"
    assert keys.keys_created == 1 and keys.keys_fetched == 10
    for subject in known:
        cached = keys.cached_subject_aead(branch, subject)
        assert cached is not None and made[subject].open(cached.seal(b"secret", b"aad"), b"aad") == b"secret"
    with pytest.raises(KeyShreddedError):
        keys.subject_aead(branch, erased)
    assert keys.cached_subject_aead(branch, new) is not None

    # Mostly new subjects in a read-first prefetch: the next prefetch offers at once again.
    calls.clear()
    fresh = {f"steady-fresh-{uuid.uuid4().hex[:8]}" for _ in range(5)}
    keys.prefetch(branch, fresh)
    assert calls == [("read", 5), ("offer", 5)]
    calls.clear()
    keys.prefetch(branch, {f"steady-fresh-{uuid.uuid4().hex[:8]}" for _ in range(5)})
    assert calls == [("offer", 5)]


ODD_SUBJECTS = ["Plain-UPPER-0", "quote\"back\\slash", "客户-九", "nul\x00byte", "tab\tnew\nline", "emoji-\U0001f600",
                "colon:star*?[brackets]"]


def test_scripts_that_name_keys_themselves_name_the_same_keys_as_the_client(branch_settings):
    """The activity, key-read and key-creation scripts get the subjects inside JSON arguments and name the keys
    themselves (prefix .. subject or topic): the keys must be exactly the ones the client names
    (`RedisKeyStore._k`) for every subject, escapes and non-ASCII included. An erased subject gets no retention
    expiry (the sweep would erase it again) and no key; a subject's own set of topics, as older workers wrote
    it, is still read."""
    store = build_keys(branch_settings, listen=False).store
    branch = f"{branch_settings.branch}-odd"
    subjects = [f"{s}-{uuid.uuid4().hex[:6]}" for s in ODD_SUBJECTS]
    erased = subjects[-1]
    client = store.client
    client.set(store._k("erased", branch, erased), b"{}")
    client.sadd(store._k("topics", branch, subjects[1]), "sanitized.written-before")  # the earlier layout
    try:
        store.record_subject_activity(branch, {**{(s, f"sanitized.t{i}"): None for i, s in enumerate(subjects)},
                                               (subjects[0], "sanitized.second"): 3600, (erased, "sanitized.x"): 60})
        for i, subject in enumerate(subjects[:-1]):
            expected = ({f"sanitized.t{i}"} | ({"sanitized.second"} if i == 0 else set())
                        | ({"sanitized.written-before"} if i == 1 else set()))
            assert store.subject_topics(branch, subject) == expected, subject
            assert store.erasure_view(branch, subject).topics == expected, subject
        scores = dict(client.zrange(store._k("expiry", branch), 0, -1, withscores=True))
        assert set(scores) == {subjects[0].encode()}, "an erased subject was given a retention expiry"
        assert abs(scores[subjects[0].encode()] - (time.time() + 3600)) < 30
        assert client.smembers(store._k("activity-topics", branch)) == {
            f"sanitized.t{i}".encode() for i in range(len(subjects))} | {b"sanitized.second", b"sanitized.x"}
        for i, subject in enumerate(subjects[:3]):
            client.hset(store._k("dek", branch, subject), mapping={"current": 1 + i, f"v{1 + i}": f"w{i}".encode()})
        found, gone, missing = store.get_deks(branch, subjects)
        assert found == {s: (1 + i, f"w{i}".encode()) for i, s in enumerate(subjects[:3])}
        assert gone == [erased] and missing == subjects[3:-1]
        offered = [(s, f"new-{i}".encode()) for i, s in enumerate(subjects)]
        kept = store.get_or_create_deks(branch, offered)  # keeps the three, creates the rest, none for the erased
        assert kept == [(1, b"w0"), (2, b"w1"), (3, b"w2"), *((1, w) for _, w in offered[3:-1]), None]
        for subject, wrapped in offered[3:-1]:
            assert client.hget(store._k("dek", branch, subject), "v1") == wrapped, subject
        assert not client.exists(store._k("dek", branch, erased))
    finally:
        for key in client.scan_iter(match=store._k("*", branch, "*"), count=1000):
            client.delete(key)
        for key in client.scan_iter(match=store._k("*", branch), count=1000):
            client.delete(key)

def test_an_erased_subject_costs_one_key_store_answer_per_worker(branch_settings):
    """An erasure is final: once the key store answered "erased" for a subject, this worker answers the
    subject's later events (late updates, deletes of its other rows) from memory, in batches and alone."""
    branch = branch_settings.branch
    subject = f"erased-once-{uuid.uuid4().hex[:8]}"
    eraser = build_keys(branch_settings, listen=False)
    eraser.subject_aead(branch, subject)
    eraser.shred(branch, subject, b"{}")
    keys = build_sanitizer(branch_settings).keys  # another worker, which never held the key
    calls: list[str] = []
    batch, single = keys.store.send_get_or_create_deks, keys.store.get_or_create_dek
    keys.store.send_get_or_create_deks = lambda *a, **k: calls.append("batch") or batch(*a, **k)
    keys.store.get_or_create_dek = lambda *a, **k: calls.append("single") or single(*a, **k)
    keys.prefetch(branch, {subject, "erased-once-neighbour"})
    assert calls == ["batch"]
    for _ in range(3):
        with pytest.raises(KeyShreddedError):
            keys.subject_aead(branch, subject)
        keys.prefetch(branch, {subject})
    assert calls == ["batch"], "the erased subject went to the key store again"
    assert keys.subject_aead(branch, "erased-once-neighbour") is not None


def test_caches_keyed_by_plaintext_values_expire_with_the_key_cache(branch_settings):
    """Memoised masks and tokens, sanitized Kafka keys and subject tokens are maps keyed by customers'
    values: a worker must not hold them longer than it may hold a data key (docs/keys.md)."""
    now = [1_000_000.0]
    san = build_sanitizer(branch_settings)
    san._clock = lambda: now[0]
    san._value_caches_since = now[0]
    rng = random.Random(31)
    row = customer(rng, 9_700_001)
    topic, key = "br0101.public.customers", json.dumps({"customer_id": row["customer_id"]}).encode()
    first = san.process(topic, 0, 1, key, event("customers", row))
    writers = list(san._writers.values())
    assert first.decision == "protected" and any(w.memo_size for w in writers) and san._key_cache

    now[0] += branch_settings.key_cache_ttl / 2
    san.prefetch([])
    assert any(w.memo_size for w in writers) and san._key_cache, "emptied too early"

    now[0] += branch_settings.key_cache_ttl
    san.prefetch([])
    assert not any(w.memo_size for w in writers) and not san._key_cache and not san._subject_tokens

    again = san.process(topic, 0, 2, key, event("customers", row))
    assert decode(again.records[0].value)["after"]["masked"] == decode(first.records[0].value)["after"]["masked"]


# --- replies read later (`PendingReply`): a batch's key chunks (guard.pipeline.keyload) ---------------------


def _known_erased_new(keys, branch: str, tag: str) -> tuple[list[str], str, str]:
    known = [f"{tag}-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for subject in known:
        keys.subject_aead(branch, subject)
    erased = f"{tag}-erased-{uuid.uuid4().hex[:8]}"
    keys.subject_aead(branch, erased)
    keys.shred(branch, erased, b"{}")
    return known, erased, f"{tag}-new-{uuid.uuid4().hex[:8]}"


def test_a_reply_read_later_is_the_synchronous_calls_with_other_calls_in_between(branch_settings):
    """A key read sent now and read later answers what the synchronous read answers, though other calls
    were made meanwhile: its connection is its own until the reply is read (no reply goes to the wrong
    caller), and is back in the pool after."""
    branch = branch_settings.branch
    keys = build_keys(branch_settings, listen=False)
    known, erased, new = _known_erased_new(keys, branch, "later")
    store = keys.store
    subjects = [*known, erased, new]
    pending = store.send_get_deks(branch, subjects)
    view = store.commit_view(branch)  # another request and reply while this one waits
    assert store.get_deks(branch, subjects[:1])[0].keys() == {known[0]}
    got = pending.result()
    assert got == store.get_deks(branch, subjects) and pending.result() is got
    assert set(got[0]) == set(known) and got[1] == [erased] and got[2] == [new]
    assert store.commit_view(branch) == view
    pool = store.client.connection_pool
    assert len(pool._in_use_connections) == 0, "a read reply's connection goes back to the pool"


def test_a_reply_whose_script_or_connection_was_lost_is_asked_again(branch_settings, stack):
    """A script the server no longer has (a restart or `SCRIPT FLUSH`) and a connection lost before the reply
    are answered by the ordinary call at `result`: the same answer, one more round trip, never a wrong one."""
    from guard.keys.redis_client import redis_client
    from tests.integration.kafka_helpers import admin_redis_env

    branch = branch_settings.branch
    keys = build_keys(branch_settings, listen=False)
    known, erased, new = _known_erased_new(keys, branch, "lost")
    store = keys.store
    subjects = [*known, erased, new]
    want = store.get_deks(branch, subjects)
    admin_env = admin_redis_env(stack)
    admin = redis_client(admin_env["GUARD_REDIS_URL"], admin_env["GUARD_REDIS_PASSWORD_FILE"])
    admin.script_flush()
    trips = store.round_trips
    assert store.send_get_deks(branch, subjects).result() == want
    assert store.round_trips == trips + 2  # the reply said NOSCRIPT; the ordinary call loaded it again
    pending = store.send_get_deks(branch, subjects)
    pending._conn.disconnect()  # lost before the reply
    assert pending.result() == want
    # offers too: the creation is asked again; the key a lost first attempt stored is the one answered
    made = keys._kek(branch).mint_aeads([f"dek/{branch}/{new}"], 1)
    pending = store.send_get_or_create_deks(branch, [(new, made[0][0])])
    pending._conn.disconnect()
    assert pending.result() == [(1, made[0][0])]


def test_a_reply_nobody_reads_is_dropped_with_its_connection(branch_settings):
    """A batch given up drops its chunk in flight: its connection is closed, not returned half-read, the next
    calls get their own replies, and nothing of the dropped prefetch is cached."""
    branch = branch_settings.branch
    keys = build_keys(branch_settings, listen=False)
    store = keys.store
    subject = f"dropped-{uuid.uuid4().hex[:8]}"
    made = keys._kek(branch).mint_aeads([f"dek/{branch}/{subject}"], 1)
    pending = store.send_get_or_create_deks(branch, [(subject, made[0][0])])
    pending.drop()
    assert len(store.client.connection_pool._in_use_connections) == 0
    assert store.commit_view(branch)[0] >= 0  # the pool's next connection is in step
    fetch = keys.send_prefetch(branch, {subject})
    assert fetch is not None
    keys.drop_prefetch(fetch)
    assert keys.cached_subject_aead(branch, subject) is None, "a dropped prefetch caches nothing"
    keys.prefetch(branch, {subject})
    cached = keys.cached_subject_aead(branch, subject)
    # whichever request stored the subject's key first, every later call finds that one
    found, _, _ = store.get_deks(branch, [subject])
    assert found[subject][0] == 1
    assert cached is not None and keys.subject_aead(branch, subject).open(cached.seal(b"x", b"aad"), b"aad") == b"x"


def test_a_prefetch_offers_each_subject_one_key_however_often_it_is_named(branch_settings):
    """A subject named twice in one prefetch (two tables' rows of one customer) is offered one key: the creation
    script would otherwise store both, the second replacing the first, and a worker could seal with the first."""
    branch = branch_settings.branch
    keys = build_keys(branch_settings, listen=False)
    subject = f"twice-{uuid.uuid4().hex[:8]}"
    fetch = keys.send_prefetch(branch, [subject, "twice-other-" + subject, subject])
    assert fetch is not None and fetch.missing == [subject, "twice-other-" + subject]
    keys.finish_prefetch(fetch)
    assert keys.keys_created == 2
    cached = keys.cached_subject_aead(branch, subject)
    other = build_keys(branch_settings, listen=False).subject_aead(branch, subject)  # what the store holds
    assert cached is not None and other.open(cached.seal(b"x", b"aad"), b"aad") == b"x"

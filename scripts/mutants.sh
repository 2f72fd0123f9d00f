#!/usr/bin/env bash
# Mutation testing of the delivery-critical code with cargo-mutants
# (crates.io): each mutant is one small change to the code (a condition
# flipped, a return value replaced); a mutant the tests do not catch is a
# behaviour no test pins down.
#
# Not in CI: on two cores it takes about an hour. Run it before changing
# claim, record, the worker's decisions, the gate or the client's
# classification, and keep BENCHMARKS.md's summary current.
#
#   scripts/mutants.sh                 # every group below
#   scripts/mutants.sh logic           # one group: logic | client | delivery
#   scripts/mutants.sh client delivery # several groups
#   MUTANTS_TIMEOUT=180 scripts/mutants.sh
#   MUTANTS_ONLY='gave_up' MUTANTS_OUT=target/mutants-recheck \
#     scripts/mutants.sh delivery      # re-check some of a group's mutants
#                                      # (a regex on their names) after a new test
#
# Mutants are applied IN PLACE (the incremental build is what makes this
# affordable): do not edit the tree while it runs. cargo-mutants restores
# each file after its mutant; the script checks the tree is clean at the end.
#
# Every missed mutant is listed with its note from
# scripts/mutants-explained.txt (why no test can or should catch it); a
# missed mutant without a note fails the run (exit 1).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/pg.sh
source scripts/pg.sh

command -v cargo-mutants >/dev/null 2>&1 || cargo install cargo-mutants --locked
SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh)
export SPICEDB_LIBRARY_PATH
pg_start

OUT=${MUTANTS_OUT:-target/mutants}
TIMEOUT=${MUTANTS_TIMEOUT:-120}
GROUPS_TO_RUN=${*:-delivery client logic}
mkdir -p "$OUT"

run_group() {
  local name=$1
  shift
  echo "== mutants: $name ==" >&2
  # cargo-mutants exits non-zero when a mutant is missed; the report below decides.
  cargo mutants --in-place --no-shuffle --timeout "$TIMEOUT" --build-timeout 900 \
    --output "$OUT/$name" "$@" || true
}

for group in $GROUPS_TO_RUN; do
  case $group in
    # Pure logic against the unit tests (one build of the library's tests
    # per mutant, the cheapest group): the gate (circuit, 401 pause), the
    # answer classes, and the client's classification of what came back
    # (the contract's body, Retry-After, text made terminal-safe).
    logic)
      run_group logic \
        --file src/delivery/gate.rs --file src/delivery/outcome.rs --file src/auth_client.rs \
        --re "${MUTANTS_ONLY:-src/delivery/(gate|outcome)\.rs|AuthRequest|BearerToken|success|parse_retry_after|one_line|is_bidi_control|short_message|consistency_token}" \
        -- --lib
      ;;
    # The client on the wire: redirects not followed, bodies cut off, TLS,
    # URLs shown without passwords, against the raw-server and delivery tests.
    client)
      run_group client \
        --file src/auth_client.rs \
        --re "${MUTANTS_ONLY:-AuthClient|read_capped|redact_url|error_chain}" \
        -- --test auth_client --test delivery --test cli
      ;;
    # SQL-backed: claim, record, and the worker's decisions (dead by
    # attempts and age, the principal policy, readiness, holding rows back
    # while the gate is open, which database errors are retried and when a
    # one-shot run gives up), against the delivery tests. cargo-mutants
    # does not mutate SQL text; the SQL's guards (the lease token in
    # record, the order rule in claim) were checked by hand (BENCHMARKS.md).
    delivery)
      run_group delivery \
        --file src/outbox/claim.rs --file src/outbox/record.rs --file src/delivery/worker.rs \
        --file src/db.rs \
        --re "${MUTANTS_ONLY:-src/outbox/|decide|apply_principal_policy|Health::ready|match guard !is_probe|Progress::give_up|Progress::gave_up|is_transient}" \
        -- --test delivery
      ;;
    *) echo "unknown group $group (logic | client | delivery)" >&2; exit 2 ;;
  esac
done

if ! git diff --quiet -- src; then
  echo "WARNING: src/ differs from git after the run: a mutant may not have been restored" >&2
  git diff --stat -- src >&2
fi

# The report: counts per group, then every missed (or timed-out) mutant
# with its note. Notes match on the mutant's file and description, line
# numbers ignored, so they survive edits elsewhere in the file.
python3 - "$OUT" $GROUPS_TO_RUN <<'PY'
import pathlib, re, sys

out = pathlib.Path(sys.argv[1])
groups = sys.argv[2:]
strip = lambda line: re.sub(r":\d+:\d+:", ":", line.strip())
notes = {}
for line in pathlib.Path("scripts/mutants-explained.txt").read_text().splitlines():
    if line.strip() and not line.startswith("#") and " | " in line:
        mutant, note = line.split(" | ", 1)
        notes[strip(mutant)] = note.strip()

def read(group, kind):
    path = out / group / "mutants.out" / f"{kind}.txt"
    return [l for l in path.read_text().splitlines() if l.strip()] if path.exists() else []

unexplained = 0
totals = {"caught": 0, "missed": 0, "timeout": 0, "unviable": 0}
for group in groups:
    counts = {kind: len(read(group, kind)) for kind in totals}
    for kind, n in counts.items():
        totals[kind] += n
    print(f"{group}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    for kind in ("missed", "timeout"):
        for mutant in read(group, kind):
            note = notes.get(strip(mutant))
            if note is None:
                unexplained += 1
                note = "UNEXPLAINED: add a test that kills it, or a note to scripts/mutants-explained.txt"
            print(f"  {kind.upper()} {mutant}\n      -> {note}")
print("total: " + ", ".join(f"{n} {kind}" for kind, n in totals.items())
      + f"; {unexplained} missed without an explanation")
sys.exit(1 if unexplained else 0)
PY

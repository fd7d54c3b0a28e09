#!/usr/bin/env bash
# Static checks run by CI (through `./dev check`): ruff, mypy --strict, buf lint / format /
# breaking, codegen drift (regenerate car_grpc/v1, docs/api-table.md, clients/go/gen and
# clients/node/gen, and fail on any difference), and the Go client and the generated
# TypeScript client (clients/node with its generated code): gofmt, go vet (with Debian's Go
# and packages, scripts/setup_go.sh) and tsc.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
BUF=node_modules/.bin/buf

echo "== ruff"
"$PY" -m ruff check .
"$PY" -m ruff format --check .
echo "== mypy --strict"
"$PY" -m mypy
echo "== buf lint / format"
"$BUF" lint
"$BUF" format --diff --exit-code
echo "== buf breaking (against the last commit of main that has protos)"
if base=$(git log -1 --format=%H HEAD~1 -- proto 2>/dev/null) && [ -n "$base" ]; then
  # buf's FILE rules flag a file option that changes from unset to set too. An option the
  # base never set may be set once (the protos got go_package, java_package, ... in one
  # step, before any Go, Java or C# code was published); once set, any change fails.
  waived=()
  for rule in go_package:FILE_SAME_GO_PACKAGE java_package:FILE_SAME_JAVA_PACKAGE \
    java_multiple_files:FILE_SAME_JAVA_MULTIPLE_FILES \
    java_outer_classname:FILE_SAME_JAVA_OUTER_CLASSNAME \
    csharp_namespace:FILE_SAME_CSHARP_NAMESPACE; do
    git grep -q "^option ${rule%%:*} " "$base" -- proto || waived+=("\"${rule#*:}\"")
  done
  if [ ${#waived[@]} -eq 0 ]; then
    "$BUF" breaking --against ".git#ref=$base"
  else
    echo "file options unset in $base may be set: ${waived[*]} waived"
    # buf.yaml with those rules excepted (keep in step with buf.yaml).
    except=$(IFS=,; echo "${waived[*]}")
    "$BUF" breaking --against ".git#ref=$base" --config \
      "{\"version\":\"v2\",\"modules\":[{\"path\":\"proto\"}],\"breaking\":{\"use\":[\"FILE\"],\"except\":[$except]}}"
  fi
else
  echo "no earlier commit with protos: skipped"
fi
echo "== codegen drift"
"$PY" scripts/gen_protos.py >/dev/null 2>&1
if ! git diff --exit-code --stat -- car_grpc/v1 || [ -n "$(git status --porcelain -- car_grpc/v1)" ]; then
  echo "car_grpc/v1 differs from what proto/ generates: run ./dev gen and commit" >&2
  exit 1
fi
if ! git diff --exit-code --stat -- docs/api-table.md; then
  echo "docs/api-table.md differs from what proto/ generates: run ./dev gen and commit" >&2
  exit 1
fi
for generated in clients/go/gen clients/node/gen; do
  if ! git diff --exit-code --stat -- "$generated" || [ -n "$(git status --porcelain -- "$generated")" ]; then
    echo "$generated differs from what proto/ generates (buf.gen.yaml): run ./dev gen and commit" >&2
    exit 1
  fi
done
echo "== Go (clients/go): gofmt, go vet"
unformatted=$(cd clients/go && gofmt -l car cmd gen)
if [ -n "$unformatted" ]; then
  echo "gofmt would change: $unformatted" >&2
  exit 1
fi
(cd clients/go && GOFLAGS=-mod=vendor GOPROXY=off go vet ./...)
echo "== TypeScript (clients/node and its gen/): tsc"
node_modules/.bin/tsc -p clients/node/tsconfig.json
echo "all checks passed"

#!/bin/sh
# Instructions per call on the no-I/O driver, raw and through sqlretry
# (internal/hotpathcg), counted by callgrind: (instructions of 30,000 calls
# - those of 10,000) / 20,000, the fewest of $RUNS runs (the transaction
# counts vary by a few tens between runs: hotpathcg yields after each
# transaction so that database/sql's goroutine per transaction runs at
# once, not in batches of varying size); "own" is the instructions per
# call in package sqlretry's own functions (callgrind_annotate, self cost,
# one run of 30,000 calls), which that variation does not reach. Asynchronous
# preemption is off (callgrind fails on its signals), GC off, one P.
# Usage: scripts/hotpath-callgrind.sh [op...]
set -e
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
bin=$(mktemp -d)/hotpathcg
trap 'rm -rf "$(dirname "$bin")"' EXIT
go build -o "$bin" ./internal/hotpathcg
ir() { # variant op n
	GODEBUG=asyncpreemptoff=1 GOGC=off GOMAXPROCS=1 valgrind --tool=callgrind \
		--callgrind-out-file=/dev/null "$bin" "$1" "$2" "$3" 2>&1 |
		sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
percall() { # variant op: the fewest of RUNS runs
	best=
	for _ in $(seq "$RUNS"); do
		a=$(ir "$1" "$2" 10000)
		b=$(ir "$1" "$2" 30000)
		v=$(((b - a) / 20000))
		if [ -z "$best" ] || [ "$v" -lt "$best" ]; then best=$v; fi
	done
	echo "$best"
}
own() { # op
	out=$(dirname "$bin")/own.out
	GODEBUG=asyncpreemptoff=1 GOGC=off GOMAXPROCS=1 valgrind --tool=callgrind \
		--callgrind-out-file="$out" "$bin" sqlretry "$1" 30000 >/dev/null 2>&1
	callgrind_annotate --auto=no --threshold=100 "$out" |
		awk '/^ *[0-9,]+ \( *[0-9.]+%\)  .*github.com\/sqlretry\/sqlretry[.]/ { v = $1; gsub(",", "", v); s += v }
			END { printf "%d", s / 30000 }'
}
printf '%-12s %8s %9s %7s %5s\n' op raw sqlretry extra own
for op in ${*:-exec query prepared tx runintx runintxbusy}; do
	raw=$(percall raw "$op")
	sr=$(percall sqlretry "$op")
	printf '%-12s %8d %9d %+7d %5d\n' "$op" "$raw" "$sr" $((sr - raw)) "$(own "$op")"
done

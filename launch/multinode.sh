#!/usr/bin/env bash
# Starts one node of a multi-node burnrun job by hand. Run it on every node with the same
# settings and this node's NODE_RANK; the arguments are burnrun's subcommand or `-- PROGRAM ARGS`.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=4 TOKEN_FILE=/shared/job.key \
#       launch/multinode.sh bench allreduce
#
# NNODES, NODE_RANK, MASTER_ADDR (node 0's host name or address), MASTER_PORT (a free port on
# node 0): required. NPROC: ranks per node (default 1). TOKEN_FILE: the job secret; node 0
# creates it (mode 0600) when missing and the other nodes wait for it, so put it on a shared file
# system or copy it over. BURNRUN: the binary (default: burnrun on PATH).
set -euo pipefail
: "${NNODES:?NNODES: number of nodes}" "${NODE_RANK:?NODE_RANK: this node, 0..NNODES-1}"
: "${MASTER_ADDR:?MASTER_ADDR: node 0 host}" "${MASTER_PORT:?MASTER_PORT: node 0 port}"
: "${TOKEN_FILE:?TOKEN_FILE: file holding the job secret}"

if [ "$NODE_RANK" = 0 ]; then
    echo "launch/multinode.sh: on node r of 1..$((NNODES - 1)), run:" >&2
    echo "  NNODES=$NNODES NODE_RANK=r MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT NPROC=${NPROC:-1} TOKEN_FILE=$TOKEN_FILE $0 $*" >&2
fi

exec "${BURNRUN:-burnrun}" \
    --nnodes "$NNODES" \
    --node-rank "$NODE_RANK" \
    --nproc-per-node "${NPROC:-1}" \
    --master-addr "$MASTER_ADDR" \
    --master-port "$MASTER_PORT" \
    --secret-file "$TOKEN_FILE" \
    "$@"

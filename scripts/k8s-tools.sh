#!/usr/bin/env bash
# Filled in by the operator/image work: installs and caches tools the tests need.
set -euo pipefail

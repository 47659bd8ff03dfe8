#!/usr/bin/env bash
# Helpers shared by the launch scripts (sourced, not run).
#
#   run CMD ARGS...   run a command, or with DRY_RUN=1 print it shell-quoted
#   quote WORD        print WORD quoted for a POSIX shell (like Python's shlex.quote)
#   quote_cmd WORDS   print WORDS quoted and joined by spaces
#   opt_value "$@"    read the value of "--opt=value" or "--opt value"
#   die MSG           print MSG to stderr and exit with status 2
#   info MSG          print MSG to stderr
#
# In dry-run mode stdout carries only the commands, one per line, so the output
# can be copy-pasted or compared; every other message goes to stderr.

# 1: print commands instead of running them. The scripts set it from --dry-run.
DRY_RUN=0

die() {
  echo "error: $*" >&2
  exit 2
}

info() {
  echo "$*" >&2
}

# Quote one word so that a POSIX shell reads it back unchanged. Words made only
# of safe characters are left as they are; anything else is put in single
# quotes, with each ' written as '"'"'. Same rule as Python's shlex.quote.
quote() {
  local word=$1
  local squote="'"
  if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//$squote/$squote\"$squote\"$squote}"
  fi
}

# Quote every argument and join them with single spaces.
quote_cmd() {
  local sep=''
  local word
  for word in "$@"; do
    printf '%s' "$sep"
    quote "$word"
    sep=' '
  done
}

# Run a command, or print it (quoted, on one line) when DRY_RUN=1.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    quote_cmd "$@"
    echo
  else
    info "+ $(quote_cmd "$@")"
    "$@"
  fi
}

# Option values may be given as "--opt=value" or as "--opt value". Call as
#   opt_value "$@"; X=$OPT_VALUE; shift "$OPT_SHIFT"
# from inside the argument loop, with "$1" the option.
# shellcheck disable=SC2034  # OPT_VALUE and OPT_SHIFT are read by the caller
OPT_VALUE=''
OPT_SHIFT=1
# shellcheck disable=SC2034
opt_value() {
  if [[ $1 == *=* ]]; then
    OPT_VALUE=${1#*=}
    OPT_SHIFT=1
  elif [[ $# -ge 2 ]]; then
    OPT_VALUE=$2
    OPT_SHIFT=2
  else
    die "$1 needs a value"
  fi
}

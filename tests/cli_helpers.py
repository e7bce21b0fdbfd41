"""Checks shared by the tests of command-line scripts."""


def assert_one_line_error(result, prefix: str) -> str:
  """Asserts a failed run printed only `error: ...` on one stderr line.

  Args:
    result: a finished `subprocess.run(..., capture_output=True, text=True)`.
    prefix: how the line must start.

  Returns:
    The error line.
  """
  assert result.returncode != 0
  assert result.stdout == ""
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith(prefix), lines[0]
  return lines[0]

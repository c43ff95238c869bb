# The suite runs against a real Kinesis emulator on 127.0.0.1: the embedded
# one (started here), or the one named by CONVOY_KINESIS_ENDPOINT.
endpoint = Convoy.TestSupport.start_emulator!()
IO.puts("Kinesis emulator for the tests: #{endpoint}")

Convoy.TestTelemetry.start()
ExUnit.start(exclude: Convoy.TestSupport.excluded_tags(), timeout: 300_000)

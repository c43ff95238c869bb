defmodule Convoy.ConformanceTest.Kinesis do
  use ExUnit.Case, async: true
  use Convoy.Conformance, adapter: Convoy.Conformance.KinesisAdapter
end

defmodule Convoy.ConformanceTest.Memory do
  use ExUnit.Case, async: true
  use Convoy.Conformance, adapter: Convoy.Conformance.MemoryAdapter
end

defmodule Convoy.PathDependencyTest do
  use ExUnit.Case, async: true

  @moduletag timeout: 600_000
  @root Path.expand("../..", __DIR__)

  @tag :tmp_dir
  test "a Mix project depending on Convoy by path compiles it and calls the NIF", %{tmp_dir: dir} do
    app = Path.join(dir, "host_app")
    File.mkdir_p!(Path.join(app, "lib"))

    File.write!(Path.join(app, "mix.exs"), """
    defmodule HostApp.MixProject do
      use Mix.Project
      def project, do: [app: :host_app, version: "0.1.0", deps: [{:convoy, path: #{inspect(@root)}}]]
      def application, do: [extra_applications: [:logger]]
    end
    """)

    script = """
    :ok = Convoy.Native.debug_echo_from_task(self(), "from host")
    receive do
      {:convoy_echo, "convoy-worker", "from host"} -> IO.puts("NIF_OK")
    after
      5_000 -> System.halt(1)
    end
    """

    env = [{"MIX_ENV", "dev"}, {"MIX_BUILD_PATH", nil}]

    {out, status} =
      System.cmd("mix", ["run", "-e", script], cd: app, env: env, stderr_to_stdout: true)

    assert status == 0, out
    assert out =~ "NIF_OK"
  end
end

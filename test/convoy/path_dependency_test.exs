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

    # An asynchronous NIF answered from the runtime; and no test hook in a
    # dependency's build.
    script = """
    config = Convoy.KinesisConfig.resolve(endpoint_url: "http://127.0.0.1:9", region: "us-east-1",
      access_key_id: "a", secret_access_key: "b")
    {:ok, client} = Convoy.Native.call(&Convoy.Native.client_new(Convoy.KinesisConfig.to_native(config), &1))
    true = is_reference(client)
    try do
      Convoy.Native.debug_nif_panic()
    rescue
      e in RuntimeError -> if e.message =~ "test hook", do: IO.puts("NIF_OK")
    end
    """

    env = [{"MIX_ENV", "dev"}, {"MIX_BUILD_PATH", nil}]

    {out, status} =
      System.cmd("mix", ["run", "-e", script], cd: app, env: env, stderr_to_stdout: true)

    assert status == 0, out
    assert out =~ "NIF_OK"
  end
end

defmodule Mix.Tasks.Compile.ConvoyNif do
  @moduledoc """
  Builds Convoy's Rust NIF (`native/convoy_nif`) with cargo and copies the
  library to `priv/native/convoy_nif.so`.

  Release profile by default; set `CONVOY_NIF_PROFILE=debug` for faster debug
  builds while developing. Nothing runs when no Rust source, manifest or lock
  file is newer than the library built for the same profile. Cargo's own
  output, errors included, goes straight to the console.

  Convoy has no Hex dependencies, so this compiler is defined here rather than
  taken from the `rustler` Mix package. It works the same when Convoy is a
  `path:` dependency: every path is relative to this file.
  """
  use Mix.Task.Compiler

  @root __DIR__

  @impl true
  def run(_args) do
    # The stamp names what was built: the profile, and the test hooks when
    # Convoy's own suite runs (a dependency is compiled in :prod, without them).
    profile = profile()
    features = if Mix.env() == :test, do: ["test-hooks"], else: []
    build = Enum.join([profile | features], "+")
    target = Path.join(@root, "priv/native/convoy_nif.so")
    stamp = target <> ".profile"

    if up_to_date?(target, stamp, build) do
      {:noop, []}
    else
      build(profile, features, target, stamp, build)
    end
  end

  defp profile do
    case System.get_env("CONVOY_NIF_PROFILE", "release") do
      "debug" -> "debug"
      "release" -> "release"
      other -> Mix.raise("CONVOY_NIF_PROFILE must be debug or release, got: #{inspect(other)}")
    end
  end

  defp up_to_date?(target, stamp, build) do
    with {:ok, %{mtime: built}} <- File.stat(target, time: :posix),
         {:ok, ^build} <- File.read(stamp) do
      Enum.all?(sources(), fn source -> File.stat!(source, time: :posix).mtime <= built end)
    else
      _ -> false
    end
  end

  defp sources do
    [Path.join(@root, "Cargo.toml"), Path.join(@root, "Cargo.lock")]
    |> Enum.filter(&File.exists?/1)
    |> Kernel.++(
      Path.wildcard(Path.join(@root, "native/{convoy_nif,convoy_core}/**/*.{rs,toml}"))
    )
  end

  defp build(profile, features, target, stamp, build) do
    cargo = System.find_executable("cargo") || Mix.raise("cargo not found: install Rust (rustup)")
    args = ["build", "-p", "convoy_nif", "--manifest-path", Path.join(@root, "Cargo.toml")]
    args = if profile == "release", do: args ++ ["--release"], else: args
    args = if features == [], do: args, else: args ++ ["--features", Enum.join(features, ",")]
    Mix.shell().info("Compiling convoy_nif (cargo, #{build})")

    case System.cmd(cargo, args, cd: @root, into: IO.stream(:stdio, :line), stderr_to_stdout: true) do
      {_, 0} ->
        built = Path.join([@root, "target", profile, library_name()])
        File.mkdir_p!(Path.dirname(target))
        # Copy then rename: a running VM may have the old library mapped.
        tmp = target <> ".tmp"
        File.cp!(built, tmp)
        File.rename!(tmp, target)
        File.write!(stamp, build)
        {:ok, []}

      {_, status} ->
        Mix.raise(
          "cargo build of convoy_nif failed (exit status #{status}); see its output above"
        )
    end
  end

  defp library_name do
    case :os.type() do
      {:unix, :darwin} -> "libconvoy_nif.dylib"
      {:win32, _} -> "convoy_nif.dll"
      _ -> "libconvoy_nif.so"
    end
  end
end

defmodule Convoy.MixProject do
  use Mix.Project

  @version "0.2.0"

  def project do
    [
      app: :convoy,
      version: @version,
      elixir: "~> 1.14",
      compilers: [:convoy_nif | Mix.compilers()],
      elixirc_paths: elixirc_paths(Mix.env()),
      start_permanent: Mix.env() == :prod,
      deps: [],
      description: "Produce to and consume from AWS Kinesis through a Rust NIF",
      docs: [main: "readme", extras: ["README.md", "CHANGELOG.md"]]
    ]
  end

  def application do
    [
      extra_applications: [:logger],
      mod: {Convoy.Application, []}
    ]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]
end

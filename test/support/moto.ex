defmodule Convoy.TestSupport.Moto do
  @moduledoc false
  # moto's server (PyPI `moto[server]`) as the DynamoDB of the lease tests:
  # installed into a project-local venv (_build/moto-venv) on first use,
  # started on 127.0.0.1 on a free port, and left running for the whole run
  # (stopped when the test VM exits: its stdin closes). boto3 comes along, as
  # an independent client that reads what Convoy wrote.

  import ExUnit.Assertions

  @root Path.expand("../..", __DIR__)
  @venv Path.join(@root, "_build/moto-venv")
  @requirements ["moto[server]==5.2.5", "boto3==1.44.8"]

  def python!, do: Path.join(ensure_venv!(), "bin/python")

  defp ensure_venv! do
    ready = Path.join(@venv, ".ready")

    unless File.exists?(ready) and File.read!(ready) == Enum.join(@requirements, " ") do
      {out, status} = System.cmd("python3", ["-m", "venv", @venv], stderr_to_stdout: true)
      assert status == 0, out
      pip = Path.join(@venv, "bin/pip")
      {out, status} = System.cmd(pip, ["install", "-q" | @requirements], stderr_to_stdout: true)
      assert status == 0, out
      File.write!(ready, Enum.join(@requirements, " "))
    end

    @venv
  end

  @doc "The endpoint of the run's moto server, started on first call."
  def endpoint! do
    case :persistent_term.get({__MODULE__, :endpoint}, nil) do
      nil ->
        endpoint = start!()
        :persistent_term.put({__MODULE__, :endpoint}, endpoint)
        endpoint

      endpoint ->
        endpoint
    end
  end

  defp start! do
    server = Path.join(ensure_venv!(), "bin/moto_server")
    port_number = free_port()
    # Wrapped so the server dies with the test VM: `sh` exits when its stdin
    # (the Port) closes, and takes moto along.
    script = """
    "$0" -H 127.0.0.1 -p "$1" >"$2" 2>&1 &
    pid=$!
    echo "pid $pid"
    cat >/dev/null
    kill $pid
    """

    log = Path.join(@root, "_build/moto.log")

    owner =
      spawn(fn ->
        port =
          Port.open({:spawn_executable, System.find_executable("sh")}, [
            :binary,
            :exit_status,
            args: ["-c", script, server, "#{port_number}", log]
          ])

        receive do
          :never -> port
        end
      end)

    :persistent_term.put({__MODULE__, :owner}, owner)
    endpoint = "http://127.0.0.1:#{port_number}"
    wait_listening!(port_number, 200)
    endpoint
  end

  defp wait_listening!(port, 0), do: flunk("moto did not start on port #{port}")

  defp wait_listening!(port, tries) do
    case :gen_tcp.connect(~c"127.0.0.1", port, [], 200) do
      {:ok, socket} ->
        :gen_tcp.close(socket)

      {:error, _} ->
        Process.sleep(100)
        wait_listening!(port, tries - 1)
    end
  end

  def free_port do
    {:ok, socket} = :gen_tcp.listen(0, ip: {127, 0, 0, 1})
    {:ok, port} = :inet.port(socket)
    :gen_tcp.close(socket)
    port
  end

  @doc "Connection settings for the lease table at `endpoint`."
  def connection(endpoint \\ endpoint!()) do
    [
      endpoint_url: endpoint,
      region: "us-east-1",
      access_key_id: "local",
      secret_access_key: "local"
    ]
  end

  @doc "Runs `code` (Python, with `ddb` a boto3 DynamoDB client on `endpoint`) and returns its stdout."
  def boto3!(code, endpoint \\ endpoint!()) do
    prelude = """
    import boto3, json, sys
    ddb = boto3.client("dynamodb", endpoint_url=#{inspect(endpoint)}, region_name="us-east-1",
                       aws_access_key_id="local", aws_secret_access_key="local")
    """

    {out, status} = System.cmd(python!(), ["-c", prelude <> code], stderr_to_stdout: true)
    assert status == 0, out
    out
  end
end

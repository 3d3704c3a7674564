#!/usr/bin/env bash
# Packs LocalVllm.Engine and LocalVllm into a temporary local feed, creates a console app in a temporary folder
# outside the repository (none of our Directory.Build.* files apply there), takes the LocalVllm package from the feed
# with `dotnet add package`, and runs the app (Program.cs here) against a model directory. Fails if any step does.
# Usage: eng/consumer/run.sh [model-dir]   (default: ../shared/fixtures/tiny-qwen3-chat beside the checkout)
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
model="$(cd "${1:-$repo/../shared/fixtures/tiny-qwen3-chat}" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/localvllm-consumer.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# A version of its own each run: the global NuGet cache never serves an older build under the same number.
version="0.1.0-ci.$(date -u +%Y%m%d%H%M%S)"

dotnet pack "$repo/Provider.sln" -c Release -o "$work/feed" -p:Version="$version" -v q

mkdir "$work/app"
cd "$work/app"
cat > nuget.config <<XML
<?xml version="1.0" encoding="utf-8"?>
<configuration>
  <packageSources>
    <clear />
    <add key="local" value="$work/feed" />
    <add key="nuget.org" value="https://api.nuget.org/v3/index.json" />
  </packageSources>
</configuration>
XML
cat > app.csproj <<XML
<Project Sdk="Microsoft.NET.Sdk">
  <PropertyGroup>
    <OutputType>Exe</OutputType>
    <TargetFramework>net10.0</TargetFramework>
    <ImplicitUsings>enable</ImplicitUsings>
    <Nullable>enable</Nullable>
  </PropertyGroup>
</Project>
XML
cp "$repo/eng/consumer/Program.cs" .
dotnet add package LocalVllm --version "$version"
dotnet add package Microsoft.Extensions.DependencyInjection --version 10.0.15
dotnet build -c Release -v q
dotnet run -c Release --no-build -- "$model"

# The server as a .NET tool: install it from the same feed and start it with one command, as `vllm serve`.
dotnet tool install LocalVllm.Server --version "$version" --add-source "$work/feed" --tool-path "$work/tools"
port=$(( 20000 + RANDOM % 20000 ))
"$work/tools/localvllm-serve" --model "$model" --port "$port" --kv-cache-memory 16M > "$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 60); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H "Content-Type: application/json" \
  -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8, "ignore_eos": true}' | tee "$work/reply.json"
echo
grep -q '"completion_tokens":8' "$work/reply.json"
kill "$server"

using System.Text.Json;
using Microsoft.Extensions.AI;

namespace LocalVllm;

/// <summary>
/// How a model writes tool calls, read from its chat template: Hermes/Qwen <c>&lt;tool_call&gt;{json}&lt;/tool_call&gt;</c>
/// blocks (vLLM's <c>hermes</c> parser), or Llama 3's bare JSON reply <c>{"name": ..., "parameters": {...}}</c> (vLLM's
/// <c>llama3_json</c>). A template that mentions <c>&lt;tool_call&gt;</c> is Hermes; one with Llama 3's headers and a
/// <c>"parameters"</c> instruction is bare JSON; anything else is taken as Hermes, the format of the reference models.
/// </summary>
internal enum ToolCallFormat
{
    Hermes,
    BareJson,
}

internal static class ToolCallFormats
{
    public static ToolCallFormat Of(string templateSource) =>
        !templateSource.Contains("<tool_call>", StringComparison.Ordinal)
        && templateSource.Contains("<|start_header_id|>", StringComparison.Ordinal)
        && templateSource.Contains("\"parameters\"", StringComparison.Ordinal)
            ? ToolCallFormat.BareJson
            : ToolCallFormat.Hermes;

    /// <summary>Whether a call's replies may hold tool calls: it has tools and does not turn them off.</summary>
    public static bool ToolsOn(ChatOptions? o) => o?.Tools is { Count: > 0 } && o.ToolMode is not NoneChatToolMode;

    /// <summary>The head of one call of <paramref name="name"/> in <paramref name="format"/>, up to its arguments.</summary>
    public static string CallHead(ToolCallFormat format, string name) =>
        "{\"name\": " + JsonSerializer.Serialize(name) + (format == ToolCallFormat.BareJson ? ", \"parameters\": " : ", \"arguments\": ");
}

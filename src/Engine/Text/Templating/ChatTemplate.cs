using System.Text.Json.Nodes;
using LocalVllm.Engine.Loading;

namespace LocalVllm.Engine.Text.Templating;

/// <summary>
/// The model's own chat template (tokenizer_config.json's <c>chat_template</c>, or <c>chat_template.jinja</c>), rendered
/// as Hugging Face's <c>apply_chat_template</c> does: context = messages, tools (none when absent), documents (none),
/// add_generation_prompt, the tokenizer's special tokens, then any extra keyword arguments such as enable_thinking.
/// </summary>
public sealed class ChatTemplate
{
    private readonly JinjaTemplate _default;
    private readonly JinjaTemplate? _toolUse;
    private readonly Dictionary<string, object?> _specialTokens;

    /// <summary>Creates a template from source; <paramref name="specialTokens"/> are bos_token, eos_token and friends.</summary>
    public ChatTemplate(string source, IReadOnlyDictionary<string, string>? specialTokens = null, string? toolUseSource = null)
    {
        Source = source;
        _default = new JinjaTemplate(source);
        _toolUse = toolUseSource is null ? null : new JinjaTemplate(toolUseSource);
        _specialTokens = (specialTokens ?? new Dictionary<string, string>()).ToDictionary(kv => kv.Key, kv => (object?)kv.Value);
    }

    /// <summary>The template's Jinja source.</summary>
    public string Source { get; }

    /// <summary>Loads the template of <paramref name="dir"/>, or returns null when the model has none.</summary>
    public static ChatTemplate? Load(ModelDirectory dir) => Load(dir.Path);

    /// <summary>
    /// Loads the template from the tokenizer files in <paramref name="folder"/>, or returns null when there is none.
    /// <paramref name="replacement"/> (as vLLM's <c>--chat-template</c>: the path of a Jinja file, or the template
    /// itself) takes the place of the model's own template; the special tokens still come from the folder.
    /// </summary>
    public static ChatTemplate? Load(string folder, string? replacement = null)
    {
        if (replacement is not null)
        {
            var source = ReplacementSource(replacement);
            try
            {
                return new ChatTemplate(source, SpecialTokens(ReadConfig(folder)));
            }
            catch (TemplateException e)
            {
                throw new InvalidDataException($"The chat template given in EngineOptions.ChatTemplate does not parse: {e.Message}", e);
            }
        }
        try
        {
            return LoadCore(folder);
        }
        catch (Exception e) when (e is InvalidOperationException or NullReferenceException or FormatException or KeyNotFoundException)
        {
            throw new InvalidDataException($"The chat template settings in '{folder}' (tokenizer_config.json 'chat_template', chat_template.jinja) are malformed: {e.Message}", e);
        }
    }

    /// <summary>
    /// The template text of a replacement: the file it names when one exists, else the text itself when it reads as a
    /// Jinja template (has <c>{{</c> or <c>{%</c>); anything else is a file that is not there.
    /// </summary>
    internal static string ReplacementSource(string replacement)
    {
        if (File.Exists(replacement)) return File.ReadAllText(replacement);
        if (replacement.Contains("{{", StringComparison.Ordinal) || replacement.Contains("{%", StringComparison.Ordinal)) return replacement;
        throw new FileNotFoundException($"The chat template '{replacement}' is neither a file that exists ({Path.GetFullPath(replacement)}) nor a Jinja template.", replacement);
    }

    /// <summary>The folder's tokenizer_config.json, or null when it has none.</summary>
    private static JsonObject? ReadConfig(string folder)
    {
        var configPath = Path.Combine(folder, "tokenizer_config.json");
        return File.Exists(configPath) ? JsonFiles.ReadObject(configPath) : null;
    }

    private static Dictionary<string, string> SpecialTokens(JsonObject? config)
    {
        var special = new Dictionary<string, string>();
        foreach (var key in new[] { "bos_token", "eos_token", "pad_token", "unk_token" })
            if (TokenText(config?[key]) is string s) special[key] = s;
        return special;
    }

    private static ChatTemplate? LoadCore(string folder)
    {
        var config = ReadConfig(folder);
        var special = SpecialTokens(config);

        string? source = null, toolUse = null;
        switch (config?["chat_template"])
        {
            case JsonValue v:
                source = v.GetValue<string>();
                break;
            case JsonArray named:
                foreach (var t in named)
                {
                    var name = t?["name"]?.GetValue<string>();
                    if (name == "default") source = t!["template"]!.GetValue<string>();
                    else if (name == "tool_use") toolUse = t!["template"]!.GetValue<string>();
                }
                break;
        }
        var jinja = Path.Combine(folder, "chat_template.jinja");
        if (source is null && File.Exists(jinja)) source = File.ReadAllText(jinja);
        return source is null ? null : new ChatTemplate(source, special, toolUse);
    }

    /// <summary>
    /// Renders <paramref name="messages"/> (a JSON array of {role, content, tool_calls...}) with optional
    /// <paramref name="tools"/> (JSON array of tool definitions). A template's <c>raise_exception</c> surfaces as
    /// <see cref="TemplateRaisedException"/>.
    /// </summary>
    public string Render(JsonArray messages, JsonArray? tools = null, bool addGenerationPrompt = true,
        IReadOnlyDictionary<string, JsonNode?>? extraContext = null)
    {
        ArgumentNullException.ThrowIfNull(messages);
        var context = new Dictionary<string, object?>
        {
            ["messages"] = JinjaValues.FromJson(messages),
            ["tools"] = tools is null ? null : JinjaValues.FromJson(tools),
            ["documents"] = null,
            ["add_generation_prompt"] = addGenerationPrompt,
        };
        foreach (var (k, v) in _specialTokens) context[k] = v;
        if (extraContext is not null)
            foreach (var (k, v) in extraContext) context[k] = JinjaValues.FromJson(v);
        var template = tools is { Count: > 0 } && _toolUse is not null ? _toolUse : _default;
        return template.Render(context);
    }

    /// <summary>
    /// <paramref name="rendered"/> (the chat rendered without a generation prompt) cut right after the final message's
    /// content, so that the model continues that message: the final message's text (trimmed) must appear in the render.
    /// </summary>
    public static string ContinueFinalMessage(string rendered, JsonArray messages)
    {
        ArgumentNullException.ThrowIfNull(rendered);
        ArgumentNullException.ThrowIfNull(messages);
        string content = messages.Count > 0 && messages[^1]?["content"] is JsonValue v && v.GetValueKind() == System.Text.Json.JsonValueKind.String ? v.GetValue<string>().Trim() : "";
        if (content.Length == 0)
            throw new ArgumentException("continue_final_message needs a final message with text to continue.", nameof(messages));
        int at = rendered.LastIndexOf(content, StringComparison.Ordinal);
        if (at < 0)
            throw new ArgumentException("continue_final_message: the final message does not appear in the rendered chat (the chat template changed or dropped it), so it cannot be continued.", nameof(messages));
        return rendered[..(at + content.Length)];
    }

    private static string? TokenText(JsonNode? n) => n switch
    {
        JsonValue v when v.GetValueKind() == System.Text.Json.JsonValueKind.String => v.GetValue<string>(),
        JsonObject o => o["content"]?.GetValue<string>(),
        _ => null,
    };
}

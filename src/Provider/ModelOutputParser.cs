using System.Text;
using System.Text.Json;

namespace LocalVllm;

/// <summary>A piece of parsed model output.</summary>
internal abstract record OutputPiece;
internal sealed record TextPiece(string Text) : OutputPiece;
internal sealed record ReasoningPiece(string Text) : OutputPiece;
/// <summary>The body of one <c>&lt;tool_call&gt;...&lt;/tool_call&gt;</c> block.</summary>
internal sealed record ToolCallPiece(string Body) : OutputPiece;

/// <summary>
/// Splits streamed model text into answer text, <c>&lt;think&gt;</c> reasoning and Hermes/Qwen <c>&lt;tool_call&gt;</c>
/// blocks. Text that could be the start of a tag is held back until it is decided, so no tag and no partial tool-call
/// JSON ever leaks into the answer. Newlines right after an opening tag or a closing think tag, and right before
/// <c>&lt;/think&gt;</c>, are dropped, as Qwen's templates write them.
/// </summary>
/// <remarks>
/// With <c>taglessCallTools</c> (the names of the tools offered) and <c>taglessFormat</c>, for a model whose calls have no tags, a reply whose first
/// character other than white space opens its calls is held until it ends and then read as tool calls, one piece per
/// call: for Llama 3 (<see cref="ToolCallFormat.BareJson"/>) a <c>{</c> starts one JSON object
/// <c>{"name": ..., "parameters": {...}}</c> or several separated by <c>;</c>; for Mistral
/// (<see cref="ToolCallFormat.Mistral"/>) a <c>[</c> starts a JSON array of calls (after <c>[TOOL_CALLS]</c> when the
/// marker comes through as text). Every call must name an offered tool; a reply that is not such calls after all (a
/// JSON answer) is the answer's text.
/// </remarks>
internal sealed class ModelOutputParser(IReadOnlySet<string>? taglessCallTools = null, ToolCallFormat taglessFormat = ToolCallFormat.BareJson)
{
    private const string ThinkOpen = "<think>", ThinkClose = "</think>", CallOpen = "<tool_call>", CallClose = "</tool_call>";
    private enum State { Text, Reasoning, ToolCall, BareCalls }

    private readonly StringBuilder _buffer = new();
    private State _state = State.Text;
    private bool _dropLeadingNewlines;
    private bool _undecided = taglessCallTools is not null; // no answer text seen yet: a bare JSON call may still start

    /// <summary>Whether the text read so far ends inside a <c>&lt;think&gt;</c> block.</summary>
    public bool InReasoning => _state == State.Reasoning;

    public List<OutputPiece> Feed(string delta)
    {
        _buffer.Append(delta);
        if (_undecided && !Decide()) return [];
        return _state == State.BareCalls ? [] : Drain(final: false);
    }

    public List<OutputPiece> Finish()
    {
        _undecided = false;
        if (_state != State.BareCalls) return Drain(final: true);
        var text = _buffer.ToString().Trim();
        _buffer.Clear();
        var calls = taglessFormat == ToolCallFormat.Mistral ? MistralCalls(text, taglessCallTools!) : SplitBareCalls(text, taglessCallTools!);
        return calls is null ? [new TextPiece(text)] : [.. calls.Select(c => (OutputPiece)new ToolCallPiece(c))];
    }

    /// <summary>Once the first character other than white space is there: a bare call starts, or this is text.</summary>
    private bool Decide()
    {
        var text = _buffer.ToString();
        int first = 0;
        while (first < text.Length && char.IsWhiteSpace(text[first])) first++;
        if (first == text.Length) return false; // only white space so far: held
        _undecided = false;
        if (text[first] == (taglessFormat == ToolCallFormat.Mistral ? '[' : '{')) _state = State.BareCalls;
        return true;
    }

    /// <summary>
    /// The JSON objects of a bare-call reply (one, or several separated by <c>;</c>), each naming one of
    /// <paramref name="tools"/>; null when the text is not that.
    /// </summary>
    internal static List<string>? SplitBareCalls(string text, IReadOnlySet<string> tools)
    {
        var calls = new List<string>();
        int depth = 0, start = 0;
        bool inString = false, escaped = false;
        for (int i = 0; i <= text.Length; i++)
        {
            if (i < text.Length)
            {
                char c = text[i];
                if (inString)
                {
                    if (escaped) escaped = false;
                    else if (c == '\\') escaped = true;
                    else if (c == '"') inString = false;
                    continue;
                }
                if (c == '"') inString = true;
                else if (c is '{' or '[') depth++;
                else if (c is '}' or ']') depth--;
                if (c != ';' || depth != 0) continue;
            }
            var piece = text[start..i].Trim();
            start = i + 1;
            if (piece.Length == 0) continue;
            if (!NamesATool(piece, tools)) return null;
            calls.Add(piece);
        }
        return calls.Count > 0 ? calls : null;
    }

    /// <summary>
    /// Mistral's calls, <c>[TOOL_CALLS]</c> (when written as text) then a JSON array of call objects each naming one of
    /// <paramref name="tools"/>; null when the text is not that.
    /// </summary>
    internal static List<string>? MistralCalls(string text, IReadOnlySet<string> tools)
    {
        if (text.StartsWith(ToolCallFormats.MistralMarker, StringComparison.Ordinal)) text = text[ToolCallFormats.MistralMarker.Length..].TrimStart();
        try
        {
            using var doc = JsonDocument.Parse(text);
            if (doc.RootElement.ValueKind != JsonValueKind.Array || doc.RootElement.GetArrayLength() == 0) return null;
            var calls = doc.RootElement.EnumerateArray().Select(e => e.GetRawText()).ToList();
            return calls.All(c => NamesATool(c, tools)) ? calls : null;
        }
        catch (JsonException)
        {
            return null;
        }
    }

    private static bool NamesATool(string json, IReadOnlySet<string> tools)
    {
        try
        {
            using var doc = JsonDocument.Parse(json);
            return doc.RootElement.ValueKind == JsonValueKind.Object
                && doc.RootElement.TryGetProperty("name", out var name) && name.ValueKind == JsonValueKind.String
                && tools.Contains(name.GetString()!);
        }
        catch (JsonException)
        {
            return false;
        }
    }

    private List<OutputPiece> Drain(bool final)
    {
        var pieces = new List<OutputPiece>();
        while (true)
        {
            var text = _buffer.ToString();
            if (_dropLeadingNewlines)
            {
                int skip = 0;
                while (skip < text.Length && text[skip] is '\n' or '\r') skip++;
                if (skip > 0) { _buffer.Remove(0, skip); text = text[skip..]; }
                if (text.Length == 0) return pieces;
                _dropLeadingNewlines = false;
            }
            string[] tags = _state switch
            {
                State.Text => [ThinkOpen, CallOpen],
                State.Reasoning => [ThinkClose],
                _ => [CallClose],
            };
            int at = -1; string? tag = null;
            foreach (var t in tags)
            {
                int i = text.IndexOf(t, StringComparison.Ordinal);
                if (i >= 0 && (at < 0 || i < at)) { at = i; tag = t; }
            }
            if (tag is not null)
            {
                var before = text[..at];
                Emit(pieces, before, closing: tag is ThinkClose);
                _buffer.Remove(0, at + tag.Length);
                _state = tag switch { ThinkOpen => State.Reasoning, CallOpen => State.ToolCall, _ => State.Text };
                if (tag == CallClose) pieces.Add(new ToolCallPiece(before.Trim()));
                _dropLeadingNewlines = tag != CallClose;
                continue;
            }
            if (_state == State.ToolCall)
            {
                if (final && text.Length > 0) { pieces.Add(new TextPiece(CallOpen + text)); _buffer.Clear(); }
                return pieces; // a call is emitted only when complete
            }
            int safe = final ? text.Length : SafeLength(text, tags);
            if (!final && _state == State.Reasoning)
                while (safe > 0 && text[safe - 1] == '\n') safe--; // may be the newline before </think>
            if (safe > 0)
            {
                Emit(pieces, text[..safe], closing: false);
                _buffer.Remove(0, safe);
            }
            return pieces;
        }
    }

    private void Emit(List<OutputPiece> pieces, string text, bool closing)
    {
        if (_state == State.ToolCall) return;
        if (closing) text = text.TrimEnd('\n');
        if (text.Length == 0) return;
        pieces.Add(_state == State.Reasoning ? new ReasoningPiece(text) : new TextPiece(text));
    }

    /// <summary>How much of <paramref name="text"/> cannot be the start of one of <paramref name="tags"/>.</summary>
    private static int SafeLength(string text, string[] tags)
    {
        int safe = text.Length;
        foreach (var tag in tags)
            for (int k = Math.Min(tag.Length - 1, text.Length); k > 0; k--)
                if (string.CompareOrdinal(text, text.Length - k, tag, 0, k) == 0) { safe = Math.Min(safe, text.Length - k); break; }
        return safe;
    }
}

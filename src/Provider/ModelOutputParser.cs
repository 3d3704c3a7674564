using System.Text;

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
internal sealed class ModelOutputParser
{
    private const string ThinkOpen = "<think>", ThinkClose = "</think>", CallOpen = "<tool_call>", CallClose = "</tool_call>";
    private enum State { Text, Reasoning, ToolCall }

    private readonly StringBuilder _buffer = new();
    private State _state = State.Text;
    private bool _dropLeadingNewlines;

    /// <summary>Whether the text read so far ends inside a <c>&lt;think&gt;</c> block.</summary>
    public bool InReasoning => _state == State.Reasoning;

    public List<OutputPiece> Feed(string delta)
    {
        _buffer.Append(delta);
        return Drain(final: false);
    }

    public List<OutputPiece> Finish() => Drain(final: true);

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

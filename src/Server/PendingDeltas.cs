using System.Text;

namespace LocalVllm.Server;

/// <summary>
/// The text deltas of streamed chat completions, held while more updates are already waiting to be written: runs of
/// plain text of one field (<c>content</c> or <c>reasoning_content</c>, no logprobs, no tool calls) of a completion go
/// out as one event. The handler writes everything held before each flush, and flushes whenever nothing more is
/// waiting, so no text waits for an update that has not come: an idle server still sends each token as it comes,
/// and a loaded one sends fewer, larger events (as the completions endpoint does).
/// </summary>
internal sealed class PendingDeltas(ChatChunkWriter chunks, int completions)
{
    private readonly string?[] _field = new string?[completions];
    private readonly StringBuilder?[] _text = new StringBuilder?[completions];

    /// <summary>Takes one delta of completion <paramref name="index"/>: held when it is plain text, written otherwise (after what was held).</summary>
    public void Add(int index, ChatTurn.DeltaEvent delta)
    {
        bool plain = delta is { Field: not null, Text: not null, ToolCalls: null, Logprobs: null };
        if (plain && _text[index] is { } held && _field[index] == delta.Field)
        {
            held.Append(delta.Text);
            return;
        }
        Write(index);
        if (plain)
        {
            _field[index] = delta.Field;
            (_text[index] ??= new StringBuilder()).Append(delta.Text);
        }
        else
            chunks.Write(index, delta, null);
    }

    /// <summary>Ends completion <paramref name="index"/>: what it held, then its finish reason.</summary>
    public void Finish(int index, string finishReason)
    {
        Write(index);
        chunks.Write(index, default, finishReason);
    }

    /// <summary>Writes what every completion holds (before a flush).</summary>
    public void WriteAll()
    {
        for (int i = 0; i < completions; i++) Write(i);
    }

    private void Write(int index)
    {
        if (_field[index] is not { } field) return;
        chunks.Write(index, new ChatTurn.DeltaEvent(field, _text[index]!.ToString(), null, null), null);
        _field[index] = null;
        _text[index]!.Clear();
    }
}

using System.Text;

namespace LocalVllm.Engine.Structured;

/// <summary>
/// A sequence's structured-output state: its <see cref="GrammarMatcher"/>, the tokens that may end it (EOS and stop
/// tokens, allowed only where the match is complete and MinTokens is met), and, when the constraint starts after a
/// reasoning section, whether that section has ended yet. Owned by the engine thread; kept across preemption (the
/// output tokens, and so the match, do not change when a sequence's KV is recomputed) and dropped with the sequence.
/// </summary>
internal sealed class SequenceConstraint
{
    private readonly byte[]? _reasoningEnd;
    private readonly List<byte> _tail = [];

    public SequenceConstraint(GrammarMatcher matcher, int[] endTokens, string? reasoningEnd)
    {
        Matcher = matcher;
        EndTokens = endTokens;
        _reasoningEnd = reasoningEnd is null ? null : Encoding.UTF8.GetBytes(reasoningEnd);
        Active = _reasoningEnd is null;
    }

    public GrammarMatcher Matcher { get; }
    /// <summary>Tokens that end the sequence (EOS unless ignored, stop tokens).</summary>
    public int[] EndTokens { get; }
    /// <summary>Whether the constraint applies now (false while a reasoning section is still open).</summary>
    public bool Active { get; private set; }
    /// <summary>Set by the sampler when the constraint allowed no token at all: the request fails with a clear message.</summary>
    public bool Dead { get; set; }

    /// <summary>
    /// Sets in <paramref name="words"/> the tokens allowed next from <paramref name="matcher"/>'s state (this constraint's
    /// matcher, or a copy advanced through draft tokens): the grammar's, and the end tokens where the match is complete
    /// and <paramref name="endAllowed"/> (min_tokens met). Tokens at or past <paramref name="vocab"/> are left out.
    /// </summary>
    public void FillAllowed(GrammarMatcher matcher, Span<ulong> words, bool endAllowed, int vocab)
    {
        matcher.FillMask(words);
        if (endAllowed && matcher.IsAccepting)
            foreach (int t in EndTokens)
                if (t < vocab) words[t >> 6] |= 1UL << t;
    }

    /// <summary>Forced bytes looked at per jump: a key name, its quotes and colon, a closing run of brackets.</summary>
    private const int MaxForcedBytes = 128;

    /// <summary>
    /// Jump-forward: the tokens that may be appended after <paramref name="lastToken"/> (just accepted) without
    /// sampling, because the grammar allows exactly one continuation for their bytes. Only the tokenizer's canonical
    /// tokens are taken: the last token's text and the forced bytes are encoded together, the encoding must keep
    /// <paramref name="lastToken"/> as its first token (else the boundary itself would not be canonical), and its
    /// final token is left out (it might merge with what the model writes next). Empty when nothing is forced, the
    /// bytes are not whole UTF-8 text, or the encoding does not line up.
    /// </summary>
    public int[] ForcedTokens(int lastToken, Func<string, int[]> encode)
    {
        if (!Active || EndTokens.Contains(lastToken)) return [];
        var forced = Matcher.ForcedBytes(MaxForcedBytes);
        if (forced.Length == 0) return [];
        var last = Matcher.Vocabulary.TokenBytes(lastToken);
        var strict = new UTF8Encoding(false, throwOnInvalidBytes: true);
        string text;
        try
        {
            text = strict.GetString([.. last, .. forced]);
        }
        catch (DecoderFallbackException)
        {
            return [];
        }
        var ids = encode(text);
        if (ids.Length < 3 || ids[0] != lastToken) return [];
        var tokens = ids[1..^1];
        // The tokens must spell a prefix of the forced bytes (an encoder that normalises text would not).
        int at = 0;
        foreach (int t in tokens)
        {
            var b = Matcher.Vocabulary.TokenBytes(t);
            if (b.IsEmpty || at + b.Length > forced.Length || !b.SequenceEqual(forced.AsSpan(at, b.Length))) return [];
            at += b.Length;
        }
        return tokens;
    }

    /// <summary>
    /// Takes a generated token: advances the matcher (or, while reasoning, watches for its end and feeds the matcher the
    /// bytes after it). Returns false if the constraint refuses the token.
    /// </summary>
    public bool Accept(int token)
    {
        var bytes = Matcher.Vocabulary.TokenBytes(token);
        if (EndTokens.Contains(token)) return !Active || Matcher.IsAccepting;
        if (Active) return Matcher.TryAdvance(bytes);
        _tail.AddRange(bytes);
        var marker = _reasoningEnd!;
        var span = System.Runtime.InteropServices.CollectionsMarshal.AsSpan(_tail);
        int at = span.IndexOf(marker);
        if (at < 0)
        {
            if (_tail.Count > marker.Length) _tail.RemoveRange(0, _tail.Count - marker.Length);
            return true;
        }
        Active = true;
        var rest = span[(at + marker.Length)..].ToArray();
        _tail.Clear();
        return rest.Length == 0 || Matcher.TryAdvance(rest);
    }
}

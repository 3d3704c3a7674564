using System.Numerics;
using LocalVllm.Engine.Text.Tokenization;

namespace LocalVllm.Engine.Structured;

/// <summary>
/// The vocabulary as bytes, for constrained decoding: every token's bytes (byte-level BPE and SentencePiece byte
/// fallback alike, as <see cref="ModelTokenizer.TokenBytes"/> gives them) in a trie flattened in depth-first order, so
/// a walk that rejects a byte skips the whole subtree with one jump. Special tokens are not in it (a grammar never
/// produces them; EOS is allowed separately where the grammar accepts).
/// <para>
/// It also caches, per automaton state, the tokens that a rule accepts without leaving it (the bulk of every mask:
/// inside a string almost every token is such a token) and the few trie nodes where a token may continue past the
/// rule's end; see <see cref="GrammarMatcher.FillMask"/>. The cache is keyed by the shared automata, so it serves every
/// request and schema that uses the same rule.
/// </para>
/// </summary>
public sealed class TokenVocabulary
{
    private readonly byte[][] _tokenBytes;
    private readonly int[] _nodeEnd;
    private readonly byte[] _nodeByte;
    // [node]: depth | byte << 16 | (has children) << 24, packed so the walk reads one array for all three.
    private readonly int[] _nodeInfo;
    // [node]: when every path through the node's subtree, read from a character boundary at the node, is JSON string
    // text (Utf8Text; a path may end inside a character), the most characters on such a path (a partial one counts);
    // else -1. A walk takes such a subtree at once where the automaton steps uniformly on characters (inside a JSON
    // string: RuleDfa.CharRun), instead of stepping node by node.
    private readonly int[] _textChars;
    // The tokens in depth-first node order (tokens with the same bytes side by side); node i's own tokens are
    // _nodeTokens[_nodeTokenStart[i] .. _nodeTokenStart[i + 1]), and its whole subtree's run up to
    // _nodeTokenStart[_nodeEnd[i]]: sequential reads, for one node or a whole subtree alike.
    private readonly int[] _nodeTokens;
    private readonly int[] _nodeTokenStart;
    private readonly ulong[] _allTokens;
    private readonly Dictionary<(int Dfa, int State), StateMask> _cache = [];
    /// <summary>Token ids held by the cache; past <see cref="MaxCachedIds"/> it starts over, so a long run stays bounded.</summary>
    private long _cachedIds;

    /// <summary>The most token ids the mask cache holds (about 4 bytes each) before it is cleared.</summary>
    public const long MaxCachedIds = 64L << 20;
    private readonly Lock _lock = new();

    /// <summary>The vocabulary of <paramref name="tokenizer"/> over <paramref name="vocabSize"/> logits (at least its token count).</summary>
    public TokenVocabulary(ModelTokenizer tokenizer, int vocabSize)
        : this(Enumerable.Range(0, tokenizer.Count).Select(id => tokenizer.IsSpecial(id) ? null : tokenizer.TokenBytes(id).ToArray()).ToArray(), vocabSize)
    {
    }

    /// <summary>A vocabulary from each token's bytes (null or empty: never produced by a grammar).</summary>
    public TokenVocabulary(byte[]?[] tokenBytes, int vocabSize)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(vocabSize, tokenBytes.Length);
        VocabSize = vocabSize;
        _tokenBytes = tokenBytes.Select(b => b ?? []).ToArray();
        Words = (vocabSize + 63) / 64;
        _allTokens = new ulong[Words];

        var ids = Enumerable.Range(0, tokenBytes.Length).Where(i => _tokenBytes[i].Length > 0).ToArray();
        Array.Sort(ids, (a, b) => _tokenBytes[a].AsSpan().SequenceCompareTo(_tokenBytes[b]));
        var end = new List<int> { 0 };
        var bytes = new List<byte> { 0 };
        var depth = new List<int> { 0 };
        var path = new List<int> { 0 }; // node index at each depth
        var order = new List<int>(ids.Length); // the tokens, by node: sorted bytes come in depth-first order
        var orderNode = new List<int>(ids.Length);
        byte[] prev = [];
        foreach (int id in ids)
        {
            var b = _tokenBytes[id];
            int common = 0;
            while (common < prev.Length && common < b.Length && prev[common] == b[common]) common++;
            while (path.Count - 1 > common)
            {
                end[path[^1]] = end.Count;
                path.RemoveAt(path.Count - 1);
            }
            for (int d = common; d < b.Length; d++)
            {
                end.Add(0);
                bytes.Add(b[d]);
                depth.Add(d + 1);
                path.Add(end.Count - 1);
            }
            order.Add(id);
            orderNode.Add(path[^1]);
            _allTokens[id >> 6] |= 1UL << id;
            prev = b;
        }
        while (path.Count > 0)
        {
            end[path[^1]] = end.Count;
            path.RemoveAt(path.Count - 1);
        }
        _nodeEnd = end.ToArray();
        _nodeByte = bytes.ToArray();
        MaxDepth = depth.Max();
        if (MaxDepth > ushort.MaxValue) throw new ArgumentException($"A token of {MaxDepth} bytes is longer than the vocabulary trie supports.", nameof(tokenBytes));
        _nodeInfo = new int[_nodeEnd.Length];
        for (int i = 0; i < _nodeInfo.Length; i++)
            _nodeInfo[i] = depth[i] | _nodeByte[i] << 16 | (_nodeEnd[i] > i + 1 ? 1 << 24 : 0);
        int nodes = _nodeEnd.Length;
        // Bottom-up (children come after their parent), for each decoder state the node may be entered in.
        var chars = new short[Utf8Text.States][];
        for (int u = 0; u < Utf8Text.States; u++) chars[u] = new short[nodes];
        for (int i = nodes - 1; i >= 1; i--)
            for (int u = 0; u < Utf8Text.States; u++)
            {
                int after = Utf8Text.Next(u, _nodeByte[i]);
                int own = u == 0 ? 1 : 0, best = after < 0 ? -1 : own;
                for (int c = i + 1; c < _nodeEnd[i] && best >= 0; c = _nodeEnd[c])
                    best = chars[after][c] < 0 ? -1 : Math.Max(best, own + chars[after][c]);
                chars[u][i] = (short)Math.Min(best, short.MaxValue);
            }
        _textChars = Array.ConvertAll(chars[0], c => (int)c);
        _textChars[0] = -1;
        _nodeTokens = order.ToArray();
        _nodeTokenStart = new int[nodes + 1];
        for (int i = 0, k = 0; i <= nodes; i++)
        {
            _nodeTokenStart[i] = k;
            while (k < orderNode.Count && orderNode[k] == i) k++;
        }
    }

    /// <summary>Logit rows are this wide; masks have a bit per id below it.</summary>
    public int VocabSize { get; }
    /// <summary>64-bit words in a mask.</summary>
    public int Words { get; }
    internal int MaxDepth { get; }
    /// <summary>Nodes of the flattened trie (root included).</summary>
    public int TrieNodes => _nodeEnd.Length;

    /// <summary>A token's bytes (empty for special tokens).</summary>
    public ReadOnlySpan<byte> TokenBytes(int id) => (uint)id < (uint)_tokenBytes.Length ? _tokenBytes[id] : [];

    internal ReadOnlySpan<int> NodeEnd => _nodeEnd;
    internal ReadOnlySpan<byte> NodeByte => _nodeByte;
    internal ReadOnlySpan<ulong> AllTokens => _allTokens;

    /// <summary>Cached entries (automaton states whose masks are known).</summary>
    public int CachedStates
    {
        get { lock (_lock) return _cache.Count; }
    }

    /// <summary>Sets the tokens of nodes <paramref name="from"/> up to <paramref name="to"/> (one node, or a whole subtree) in <paramref name="mask"/>.</summary>
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveInlining)]
    internal void SetTokens(Span<ulong> mask, int from, int to)
    {
        for (int k = _nodeTokenStart[from], end = _nodeTokenStart[to]; k < end; k++)
        {
            int t = _nodeTokens[k];
            mask[t >> 6] |= 1UL << t;
        }
    }

    /// <summary>What <paramref name="dfa"/> accepts from <paramref name="state"/> without leaving the rule, computed once.</summary>
    internal StateMask Inside(RuleDfa dfa, int state)
    {
        lock (_lock)
            if (_cache.TryGetValue((dfa.Id, state), out var hit)) return hit;
        var computed = ComputeInside(dfa, state);
        lock (_lock)
        {
            if (_cachedIds + computed.Ids.Length > MaxCachedIds)
            {
                _cache.Clear();
                _cachedIds = 0;
            }
            if (_cache.TryAdd((dfa.Id, state), computed)) _cachedIds += computed.Ids.Length + computed.Boundaries.Length * 2;
        }
        return computed;
    }

    private StateMask ComputeInside(RuleDfa dfa, int state)
    {
        var mask = new ulong[Words];
        var boundaries = new List<(int, int)>();
        var stack = new int[MaxDepth + 1];
        stack[0] = state;
        // Every array in locals (the JIT then keeps their lengths and bases in registers across the loop).
        var next = dfa.Next;
        var classOf = dfa.ClassOf;
        var exits = dfa.Exits;
        var nodeInfo = _nodeInfo;
        var nodeEnd = _nodeEnd;
        var textChars = _textChars;
        var charRun = dfa.CharRun;
        int classes = dfa.ClassCount;
        int n = nodeEnd.Length;
        int i = 1;
        while (i < n)
        {
            int info = nodeInfo[i];
            int d = info & 0xFFFF;
            int parent = stack[d - 1];
            int h = textChars[i];
            if (h > 0 && charRun[parent] >= h)
            {
                // Every string of this subtree stays inside the rule, through states with no exits: all its tokens.
                SetTokens(mask, i, nodeEnd[i]);
                i = nodeEnd[i];
                continue;
            }
            int s = next[parent * classes + classOf[(info >> 16) & 0xFF]];
            if (s < 0) { i = nodeEnd[i]; continue; }
            stack[d] = s;
            SetTokens(mask, i, i + 1);
            if ((info & 1 << 24) != 0 && exits[s]) boundaries.Add((i, s));
            i++;
        }
        int allowed = 0, all = 0;
        for (int w = 0; w < Words; w++)
        {
            allowed += BitOperations.PopCount(mask[w]);
            all += BitOperations.PopCount(_allTokens[w]);
        }
        bool complement = allowed * 2 > all;
        var ids = new List<int>(complement ? all - allowed : allowed);
        for (int w = 0; w < Words; w++)
        {
            ulong bits = complement ? _allTokens[w] & ~mask[w] : mask[w];
            while (bits != 0)
            {
                ids.Add(w * 64 + BitOperations.TrailingZeroCount(bits));
                bits &= bits - 1;
            }
        }
        return new StateMask(ids.ToArray(), complement, boundaries.ToArray());
    }
}

/// <summary>
/// The tokens one automaton state accepts inside its rule (<see cref="Ids"/>, or all trie tokens but them when
/// <see cref="Complement"/>), and the trie nodes (with the state reached there) past which a token may leave the rule.
/// </summary>
internal sealed record StateMask(int[] Ids, bool Complement, (int Node, int State)[] Boundaries);
